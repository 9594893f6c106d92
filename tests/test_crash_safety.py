"""A pass that is killed, containers that die or vanish, workers that go down: on the real test bed, what the
next pass does, what the database (and so the gateway and the API) says, and what `plan` and `apply` tell the
user. Shares the bed and the manifests repository of tests/test_apply.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from test_apply import Fleet, _ids, _models

from lmstack.api.services.status import get_deployment
from lmstack.reconcile.apply import Survey
from lmstack.state import Database, Replica, Worker


@pytest.fixture
def fleet(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Fleet:
    return Fleet(tmp_path, clean_testbed, standin_image, db)


def _cli_env(fleet: Fleet, database_url: str) -> dict[str, str]:
    return {**os.environ, "LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(fleet.home),
            "LMSTACK_SSH_KEY": str(fleet.bed.ssh_key), "LMSTACK_KNOWN_HOSTS": str(fleet.bed.known_hosts),
            "NO_COLOR": "1", "COLUMNS": "200", "LMSTACK_MOUNT_ROOTS": "/tmp/lmstack-test-models"}


def _lmstack(fleet: Fleet, database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmstack", *args, "--repo", str(fleet.repo)],
                          env=_cli_env(fleet, database_url), capture_output=True, text=True, timeout=300)


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _only(fleet: Fleet, name: str, *, args: list[str], startup_timeout: str = "60s") -> None:
    """The fleet reduced to one single-replica deployment `name` with `args`, committed."""
    fleet.remove("chat")
    fleet.remove("embed")
    fleet.write(name, replicas=1, args=args, placement="{workers: [node1]}")
    path = fleet.repo / "manifests" / f"{name}.yaml"
    path.write_text(path.read_text().replace("startupTimeout: 60s", f"startupTimeout: {startup_timeout}"))
    fleet.commit(f"only {name}")


def _kill_apply_while_starting(fleet: Fleet, database_url: str) -> None:
    """Run `lmstack apply --yes` and SIGKILL it once its replica is recorded `starting`."""
    process = subprocess.Popen([sys.executable, "-m", "lmstack", "apply", "--yes", "--repo", str(fleet.repo)],
                               env=_cli_env(fleet, database_url), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_for("the replica to be starting",
                  lambda: any(r.status == "starting" for r in fleet.replicas().values()), timeout=120)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def test_a_replica_left_starting_by_a_killed_apply_is_adopted(fleet: Fleet, database_url: str) -> None:
    _only(fleet, "slow", args=["--startup-delay", "3"])
    _kill_apply_while_starting(fleet, database_url)
    before = _ids(fleet.containers())
    assert list(before) == ["slow/0"] and fleet.replicas()["slow/0"].status == "starting"

    survey, report = fleet.apply()
    assert {a.replica_name: a.kind.value for a in survey.plan.changes} == {"slow/0": "update"}
    assert "left starting" in survey.plan.changes[0].reason
    assert report is not None and report.ok, [r.message for r in report.failed]
    assert _ids(fleet.containers()) == before  # the same container, waited for, not a new one
    row = fleet.replicas()["slow/0"]
    assert row.status == "ready" and row.endpoint is not None
    assert _models(row.endpoint, row.engine_key) == ["slow"]
    _, report = fleet.apply()
    assert report is not None and report.ok and not report.results


def test_an_adopted_replica_that_never_becomes_ready_is_recreated(fleet: Fleet, database_url: str) -> None:
    _only(fleet, "stuck", args=["--startup-delay", "600"], startup_timeout="4s")
    _kill_apply_while_starting(fleet, database_url)
    before = _ids(fleet.containers())
    survey, report = fleet.apply()
    assert {a.replica_name: a.kind.value for a in survey.plan.changes} == {"stuck/0": "update"}
    assert report is not None and not report.ok
    [result] = report.failed
    assert "not ready after 4 s" in result.message and "(permanent:" in result.message
    after = _ids(fleet.containers())
    assert list(after) == ["stuck/0"] and after["stuck/0"] != before["stuck/0"]  # recreated: one, not two
    row = fleet.replicas()["stuck/0"]
    assert row.status == "failed" and row.message is not None and "(permanent:" in row.message


def test_replicas_left_pending_or_deleting_converge(fleet: Fleet) -> None:
    _, report = fleet.apply()
    assert report is not None and report.ok
    before = _ids(fleet.containers())
    # As after a kill: chat/0 between its row and its container, embed/0 half way through a delete that a
    # new commit no longer wants.
    with fleet.database.session() as session:
        session.execute(update(Replica).where(Replica.deployment_name == "chat", Replica.ordinal == 0)
                        .values(status="pending"))
        session.execute(update(Replica).where(Replica.deployment_name == "embed").values(status="deleting"))
    survey, report = fleet.apply()
    assert {a.replica_name: a.kind.value for a in survey.plan.changes} == {"chat/0": "update",
                                                                           "embed/0": "update"}
    assert report is not None and report.ok, [r.message for r in report.failed]
    assert _ids(fleet.containers()) == before  # no duplicate, no orphan, nothing restarted
    assert {name: row.status for name, row in fleet.replicas().items()} == {
        "chat/0": "ready", "chat/1": "ready", "embed/0": "ready"}


def test_a_removed_or_stopped_container_is_recorded_before_it_is_repaired(fleet: Fleet) -> None:
    _, report = fleet.apply()
    assert report is not None and report.ok
    before = _ids(fleet.containers())
    fleet.bed.docker("node1", "rm", "-f", before["chat/0"])
    fleet.bed.docker("node3", "kill", before["embed/0"])
    seen: dict[str, Any] = {}

    def look(survey: Survey) -> bool:
        # After the observe phase, before any repair: what the database, and so the API and the gateway, say.
        with fleet.database.session() as session:
            seen["chat"] = get_deployment(session=session, name="chat")
            seen["embed"] = get_deployment(session=session, name="embed")
        seen["plan"] = {a.replica_name: a.kind.value for a in survey.plan.changes}
        return True

    _, report = fleet.apply(confirm=look)
    chat = {r.name: r for r in seen["chat"].replicas}
    assert chat["chat/0"].status == "missing" and "is gone from node1" in (chat["chat/0"].message or "")
    assert chat["chat/1"].status == "ready"
    [embed] = seen["embed"].replicas
    assert embed.status == "failed" and "exit code 137" in (embed.message or "")
    assert seen["plan"] == {"chat/0": "recreate", "embed/0": "recreate"}
    assert report is not None and report.ok
    assert all(row.status == "ready" for row in fleet.replicas().values())
    # The workers' conditions, as that pass saw them: what was lost where.
    lost = _worker_conditions(fleet)
    assert lost["node1"]["Ready"][:2] == ("True", "FactsGathered")
    assert lost["node1"]["Degraded"][:2] == ("True", "ReplicasLost") and "chat/0" in lost["node1"]["Degraded"][2]
    assert lost["node3"]["Degraded"][:2] == ("True", "ReplicasLost") and "exit code 137" in lost["node3"]["Degraded"][2]
    assert lost["node2"]["Degraded"][:2] == ("False", "AsExpected")
    fleet.apply()  # repaired: the next pass sees nothing lost
    assert {name: c["Degraded"][:2] for name, c in _worker_conditions(fleet).items()} == {
        name: ("False", "AsExpected") for name in ("node1", "node2", "node3")}


def _worker_conditions(fleet: Fleet) -> dict[str, dict[str, tuple[str, str, str]]]:
    with fleet.database.session() as session:
        return {w.name: {c["type"]: (c["status"], c["reason"], c["message"]) for c in w.conditions}
                for w in session.scalars(select(Worker))}


def test_plan_observes_the_containers_unless_offline(fleet: Fleet, database_url: str) -> None:
    _, report = fleet.apply()
    assert report is not None and report.ok
    fleet.bed.docker("node3", "rm", "-f", _ids(fleet.containers())["embed/0"])

    live = _lmstack(fleet, database_url, "plan")
    assert live.returncode == 2, live.stdout + live.stderr
    assert "embed/0 is missing" in live.stdout and "recreate" in live.stdout and "No changes" not in live.stdout
    offline = _lmstack(fleet, database_url, "plan", "--offline")
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert "Containers not observed" in offline.stdout and "No changes." in offline.stdout
    assert fleet.replicas()["embed/0"].status == "ready"  # plan records nothing


def test_apply_fails_when_a_replica_is_on_a_worker_that_is_down_or_cannot_be_placed(
        fleet: Fleet, database_url: str) -> None:
    _, report = fleet.apply()
    assert report is not None and report.ok
    fleet.bed.stop_sshd("node2")  # chat/1 runs there
    down = _lmstack(fleet, database_url, "apply", "--yes")
    assert down.returncode == 1, down.stdout + down.stderr
    assert "chat/1: not checked or changed: worker node2 is not Ready" in down.stderr
    assert _worker_conditions(fleet)["node2"]["Ready"][:2] == ("False", "FactsFailed")
    fleet.bed.start_sshd("node2")

    fleet.write("big", replicas=1, gpus=1)  # no GPU anywhere on the bed
    fleet.commit("a GPU deployment")
    unplaceable = _lmstack(fleet, database_url, "apply", "--yes")
    assert unplaceable.returncode == 1, unplaceable.stdout + unplaceable.stderr
    assert "big/0: unplaceable:" in unplaceable.stderr


def test_a_container_replaced_by_hand_with_another_image_is_recreated(fleet: Fleet) -> None:
    """Someone replaces a managed container by hand, keeping lmstack's labels (and so its name, replica and spec
    hash) but running another image: the next pass sees the image differs from the replica's spec, records the
    replica failed with why, and recreates it with the image the commit asks for."""
    _, report = fleet.apply()
    assert report is not None and report.ok
    old = _ids(fleet.containers())["chat/0"]
    inspect = fleet.bed.docker("node1", "inspect", "--format", "{{json .Config.Labels}} {{.Name}}", old).stdout
    labels_json, name = inspect.rsplit(" ", 1)
    labels = {k: v for k, v in json.loads(labels_json).items() if k.startswith("lmstack.")}
    fleet.bed.docker("node1", "tag", fleet.image, "lmstack-standin:by-hand")
    fleet.bed.docker("node1", "rm", "-f", old)
    fleet.bed.docker("node1", "run", "-d", "--name", name.strip().lstrip("/"), "--network", "host",
                     *[f"--label={k}={v}" for k, v in labels.items()], "lmstack-standin:by-hand", "sleep", "300")
    seen: dict[str, Any] = {}

    def look(survey: Survey) -> bool:
        with fleet.database.session() as session:
            seen["chat"] = {r.name: r for r in get_deployment(session=session, name="chat").replicas}
        seen["plan"] = {a.replica_name: a.kind.value for a in survey.plan.changes}
        return True

    _, report = fleet.apply(confirm=look)
    assert seen["chat"]["chat/0"].status == "failed"
    assert "runs image lmstack-standin:by-hand" in (seen["chat"]["chat/0"].message or "")
    assert seen["plan"] == {"chat/0": "recreate"}
    assert report is not None and report.ok
    now = _ids(fleet.containers())["chat/0"]
    image = fleet.bed.docker("node1", "inspect", "--format", "{{.Config.Image}}", now).stdout.strip()
    assert image == fleet.image and all(row.status == "ready" for row in fleet.replicas().values())
