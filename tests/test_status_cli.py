"""`lmstack status` on the real test bed: per deployment Synced / OutOfSync / Progressing / Degraded, as the
status API (/api/sync, /api/deployments) says it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_apply import Fleet, _ids
from test_crash_safety import _cli_env, _lmstack

from lmstack.api.services.repo import RepoView
from lmstack.api.services.status import get_deployment, sync_status
from lmstack.config import Settings
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
