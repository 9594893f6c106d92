"""SIGKILL of `lmstack serve` at several points of the controller's apply, on the real test bed: while it
creates, while it waits for readiness, in the middle of a surge rollout (the replacement starting beside
the old replica), and between the stop and the create of a restart in place. After a restart, exactly the
planned containers run, every replica is Ready, no sync run is left `running`, and nothing is duplicated or
orphaned.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


# One server process (--workers 1): with several, the supervisor's controller starts applying while the
# processes are still starting, and a replica can be Ready before the server answers /healthz, so the short
# states this test kills in could pass unseen. A supervisor killed with its processes: test_serve_workers.


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

    with ServeProcess(env, workers=1) as server:  # 1: as soon as it applies the commit (facts, creates)
        _kill_when(server, "a sync run of the commit", lambda: any(r == sha for _t, _s, r in sync_runs(db)))
    with ServeProcess(env, workers=1) as server:  # 2: while it waits for a replica to become ready
        _kill_when(server, "a replica starting", lambda: "starting" in replica_status(db).values())
    with ServeProcess(env, workers=1):
        wait_for("the fleet to converge", lambda: _converged(remote, db, sha, slow))
    runs = sync_runs(db)
    assert all(status != "running" for _t, status, _r in runs), runs  # the killed runs were finished

    changed = [*slow, "--token-delay", "0.01"]
    sha = remote.push("chat", replicas=2, args=changed)
    with ServeProcess(env, workers=1) as server:  # 3: mid-surge, a replacement starting beside a serving replica
        _kill_when(server, "a surge replica beside the two serving ones", lambda: len(replica_status(db)) == 3)
    with ServeProcess(env, workers=1):
        wait_for("the rollout to converge", lambda: _converged(remote, db, sha, changed))
    runs = sync_runs(db)
    assert all(status != "running" for _t, status, _r in runs), json.dumps(runs)


# The planner stops a replica first only when no GPU is free for a surge; the bed's containers cannot have GPUs,
# so this apply takes the surge out of the plan, as the planner does on a full machine (test_rollouts does the
# same in process). It runs the real Applier and executor in a process of its own, to be killed.
_STOP_FIRST_APPLY = """
from dataclasses import replace
from lmstack.config import Settings
from lmstack.gitsource.source import load_source
from lmstack.reconcile.apply import Applier
from lmstack.reconcile.model import Plan
from lmstack.state import open_database
settings = Settings()
source = load_source(repo=settings.repo, ref=settings.ref, directory=None, settings=settings)
with Applier(source, open_database(settings), ssh_key=settings.ssh_key, known_hosts=settings.known_hosts) as applier:
    survey = applier.survey()
    [action] = survey.plan.changes
    in_place = replace(action, surge=None, placement=action.previous)
    applier.execute(replace(survey, plan=Plan((in_place,))))
"""


def test_killed_between_the_stop_and_the_create_of_a_restart_in_place_converges_after_a_restart(
        remote: Remote, db: Database, database_url: str) -> None:
    env = _env(remote, database_url)
    sha = remote.push("solo", replicas=1, args=["--token-delay", "0.01"])
    with ServeProcess(env, workers=1):
        wait_for("the first commit", lambda: _solo_converged(remote, db, sha, ["--token-delay", "0.01"]))
    [host] = set(remote.containers().values())
    changed = ["--token-delay", "0.02"]
    sha = remote.push("solo", replicas=1, args=changed)

    # Docker tells the moment the old container is destroyed; the apply is killed then, before its create.
    socket = remote.bed.host(host).docker_host
    events = subprocess.Popen(["docker", "-H", socket, "events", "--filter", "event=destroy", "--filter",
                               "label=lmstack.deployment=solo", "--format", "{{.Actor.ID}}"],
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # the events stream is open
        apply = subprocess.Popen([sys.executable, "-c", _STOP_FIRST_APPLY], env={**os.environ, **env}, cwd="/",
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert events.stdout is not None
        destroyed = events.stdout.readline().strip()
        apply.send_signal(signal.SIGKILL)
        _, stderr = apply.communicate(timeout=10)
    finally:
        events.kill()
        events.wait(10)
    assert destroyed, stderr
    left = remote.bed.docker(host, "ps", "-aq", "--filter", "label=lmstack.deployment=solo").stdout.split()
    assert left == [], "killed too late: the new container was already created"  # between stop and create
    assert replica_status(db) == {"solo/0": "draining"}  # what the killed pass left behind

    with ServeProcess(env, workers=1):
        wait_for("the restart in place to converge", lambda: _solo_converged(remote, db, sha, changed))
    runs = sync_runs(db)
    assert all(status != "running" for _t, status, _r in runs), json.dumps(runs)


def _solo_converged(remote: Remote, db: Database, sha: str, args: list[str]) -> bool:
    statuses = replica_status(db)
    return (len(statuses) == 1 and set(statuses.values()) == {"ready"} and set(remote.containers()) == set(statuses)
            and all(a == args for a in _args(db).values())
            and any(run == ("succeeded", sha) for run in [(s, r) for _t, s, r in sync_runs(db)]))
