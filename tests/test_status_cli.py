"""`lmstack status` on the real test bed: per deployment Synced / OutOfSync / Progressing / Degraded, as the
status API (/api/sync, /api/deployments) says it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from gitops import wait_for
from test_apply import Fleet, _ids
from test_crash_safety import _cli_env, _lmstack

from lmstack.api.services.repo import RepoView
from lmstack.api.services.status import get_deployment, list_workers, sync_status
from lmstack.config import Settings
from lmstack.reconcile.status import fleet_status
from lmstack.state import Database


@pytest.fixture
def fleet(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Fleet:
    return Fleet(tmp_path, clean_testbed, standin_image, db)


def _status(fleet: Fleet, database_url: str, *args: str) -> tuple[int, dict[str, Any]]:
    result = _lmstack(fleet, database_url, "status", "--json", *args)
    assert result.returncode in (0, 2), result.stdout + result.stderr
    return result.returncode, json.loads(result.stdout)


def _api_sync(fleet: Fleet) -> str:
    repo = RepoView(Settings(home=fleet.home, repo=str(fleet.repo), mount_roots=[Path("/tmp/lmstack-test-models")]),
                    max_age_s=0)
    return sync_status(database=fleet.database, repo=repo, limit=5).state


def test_status_follows_commits_and_what_passes_see(fleet: Fleet, database_url: str) -> None:
    _, report = fleet.apply()
    assert report is not None and report.ok
    code, status = _status(fleet, database_url)
    states = {d["name"]: d["state"] for d in status["deployments"]}
    assert code == 0 and states == {"chat": "Synced", "embed": "Synced"}
    assert status["sync"]["state"] == "Synced" == _api_sync(fleet)
    chat = next(d for d in status["deployments"] if d["name"] == "chat")
    assert chat["lastAppliedRevision"] == chat["lastAttemptedRevision"] == status["sync"]["head"]
    assert [(r["name"], r["worker"], r["status"]) for r in chat["replicas"]] == [
        ("chat/0", "node1", "ready"), ("chat/1", "node2", "ready")]
    text = _lmstack(fleet, database_url, "status")
    assert text.returncode == 0 and "chat  Synced  2/2 ready" in text.stdout

    # A new commit changing one deployment: that one is OutOfSync, the other still Synced.
    fleet.write("chat", replicas=2, args=["--max-model-len", "4096"])
    fleet.commit("chat: shorter context")
    code, status = _status(fleet, database_url)
    assert code == 2 and {d["name"]: d["state"] for d in status["deployments"]} == {
        "chat": "OutOfSync", "embed": "Synced"}
    assert status["sync"]["state"] == "OutOfSync" == _api_sync(fleet)

    # A container removed by hand: the pass that sees it records it (the user then declines the repair).
    fleet.bed.docker("node3", "rm", "-f", _ids(fleet.containers())["embed/0"])
    _, declined = fleet.apply(confirm=lambda survey: False)
    assert declined is None
    code, status = _status(fleet, database_url)
    embed = next(d for d in status["deployments"] if d["name"] == "embed")
    assert embed["state"] == "Degraded" and "missing" in embed["reason"]
    [replica] = embed["replicas"]
    assert replica["status"] == "missing" and "is gone from node3" in replica["message"]
    with fleet.database.session() as session:
        api = get_deployment(session=session, name="embed")
    assert api is not None and [(r.name, r.status, r.message) for r in api.replicas] == [
        (replica["name"], replica["status"], replica["message"])]

    # Without --repo: the database alone, the sync state Unknown.
    result = subprocess.run([sys.executable, "-m", "lmstack", "status"], env=_cli_env(fleet, database_url),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Sync: Unknown" in result.stdout and "embed  Degraded" in result.stdout


def test_a_rollout_is_progressing_on_its_deployment_and_workers_while_it_runs(fleet: Fleet) -> None:
    """While a pass rolls out a change, status says so at once (not only when it ends): the deployment is
    Progressing with the revision and the actions, each worker it acts on has Progressing True naming the
    replicas; when it ends both settle."""
    _, report = fleet.apply()
    assert report is not None and report.ok
    fleet.write("embed", replicas=1, placement="{workers: [node3]}", args=["--startup-delay", "3"])
    fleet.commit("embed: slow start")
    head = subprocess.run(["git", "-C", str(fleet.repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    applied: list[Any] = []
    thread = threading.Thread(target=lambda: applied.append(fleet.apply()))
    thread.start()
    try:
        seen = wait_for("embed Progressing with the new revision", lambda: next(
            (d for d in _deployments(fleet) if d.name == "embed" and d.state == "Progressing"
             and f"applying {head[:12]}" in d.reason), None), timeout_s=60, interval_s=0.05)
        assert "recreate embed/0" in seen.reason, seen.reason
        workers = _progressing_workers(fleet)
        assert workers.get("node3", ("", ""))[0] == "True" and "embed/0" in workers["node3"][1], workers
        assert workers["node1"][0] == "False"  # chat's workers: nothing happens there
    finally:
        thread.join(120)
    [(_, report)] = applied
    assert report is not None and report.ok
    assert {d.name: d.state for d in _deployments(fleet)} == {"chat": "Synced", "embed": "Synced"}
    assert {name: status for name, (status, _) in _progressing_workers(fleet).items()} == {
        "node1": "False", "node2": "False", "node3": "False"}


def _deployments(fleet: Fleet) -> tuple[Any, ...]:
    with fleet.database.session() as session:
        return fleet_status(session).deployments


def _progressing_workers(fleet: Fleet) -> dict[str, tuple[str, str]]:
    """Worker -> (status, message) of its Progressing condition, as /api/workers shows it."""
    with fleet.database.session() as session:
        listed = list_workers(session=session)
    return {w.name: next(((c.status, c.message) for c in w.conditions if c.type == "Progressing"), ("", ""))
            for w in listed.workers}
