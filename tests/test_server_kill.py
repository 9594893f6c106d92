"""SIGKILL of `lmstack serve` at several points of the controller's apply, on the real test bed: while it
creates, while it waits for readiness, and in the middle of a surge rollout (the replacement starting beside
the old replica). After a restart, exactly the planned containers run, every replica is Ready, no sync run is
left `running`, and nothing is duplicated or orphaned.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from apiserver import ServeProcess
from gitops import MODELS, Remote, replica_status, sync_runs, wait_for
from sqlalchemy import select

from lmstack.state import Database, Replica


@pytest.fixture
def remote(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Remote:
    return Remote(tmp_path, clean_testbed, standin_image)


def _env(remote: Remote, database_url: str) -> dict[str, str]:
    return {"LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(remote.home), "LMSTACK_REPO": remote.url,
            "LMSTACK_REF": "main", "LMSTACK_SSH_KEY": str(remote.bed.ssh_key),
            "LMSTACK_KNOWN_HOSTS": str(remote.bed.known_hosts), "LMSTACK_MOUNT_ROOTS": MODELS,
            "LMSTACK_POLL_INTERVAL_S": "1", "LMSTACK_DRIFT_INTERVAL_S": "1"}


def _kill_when(server: ServeProcess, what: str, check: Any) -> None:
    wait_for(what, check, timeout_s=90, interval_s=0.02)
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)


def _args(db: Database) -> dict[str, list[str]]:
    with db.session() as session:
        return {f"{r.deployment_name}/{r.ordinal}": list(r.spec.get("args", []))
                for r in session.scalars(select(Replica))}


def _converged(remote: Remote, db: Database, sha: str, args: list[str]) -> bool:
    statuses = replica_status(db)
    return (len(statuses) == 2 and set(statuses.values()) == {"ready"}
            and set(remote.containers()) == set(statuses)  # exactly the recorded ones run: none extra, none missing
            and all(a == args for a in _args(db).values())
            and any(run == ("succeeded", sha) for run in [(s, r) for _t, s, r in sync_runs(db)]))


def test_a_server_killed_while_creating_waiting_or_surging_converges_after_a_restart(
        remote: Remote, db: Database, database_url: str) -> None:
    env = _env(remote, database_url)
    slow = ["--startup-delay", "2"]  # the engine answers 2 s after it starts: a window to kill the server in
    sha = remote.push("chat", replicas=2, args=slow)

    with ServeProcess(env) as server:  # 1: as soon as it applies the commit (facts, creates)
        _kill_when(server, "a sync run of the commit", lambda: any(r == sha for _t, _s, r in sync_runs(db)))
    with ServeProcess(env) as server:  # 2: while it waits for a replica to become ready
        _kill_when(server, "a replica starting", lambda: "starting" in replica_status(db).values())
    with ServeProcess(env):
        wait_for("the fleet to converge", lambda: _converged(remote, db, sha, slow))
    runs = sync_runs(db)
    assert all(status != "running" for _t, status, _r in runs), runs  # the killed runs were finished

    changed = [*slow, "--token-delay", "0.01"]
    sha = remote.push("chat", replicas=2, args=changed)
    with ServeProcess(env) as server:  # 3: mid-surge, a replacement starting beside a serving replica
        _kill_when(server, "a surge replica beside the two serving ones", lambda: len(replica_status(db)) == 3)
    with ServeProcess(env):
        wait_for("the rollout to converge", lambda: _converged(remote, db, sha, changed))
    runs = sync_runs(db)
    assert all(status != "running" for _t, status, _r in runs), json.dumps(runs)
