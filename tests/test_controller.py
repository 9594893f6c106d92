"""The controller (lmstack/controller): when passes run (coalescing, retries, stopping), and real passes on the
multi-host test bed and PostgreSQL: a commit pushed to a bare remote is applied by polling alone, by the
watcher of a local repository's refs, and by exactly one of two servers sharing the database (the other takes
over when the holder of the leader lock dies).

The first tests give the Controller its pass as a function (its seam for what a pass does), to control when
a pass ends; the others run the real passes.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from apiserver import ServeProcess
from gitops import MODELS, Remote, replica_status, sync_runs, wait_for
from sqlalchemy import select

from lmstack.config import ssh_files
from lmstack.controller import Controller, PassResult, PassRunner, build_controller
from lmstack.reconcile.leader import INTERRUPTED, current_holder
from lmstack.state import Database


def _ok(trigger: str) -> PassResult:
    return PassResult(trigger, "applied", "a" * 40, f"{trigger}: applied", observed=True)


# -- when passes run ------------------------------------------------------------------------------------------


def test_a_burst_of_pushes_during_a_pass_makes_one_more_pass_not_one_each() -> None:
    seen: list[str] = []
    in_pass, release = threading.Event(), threading.Event()

    def run_pass(trigger: str) -> PassResult:
        seen.append(trigger)
        if len(seen) == 1:
            in_pass.set()
            assert release.wait(30)
        return _ok(trigger)

    controller = Controller(run_pass, poll_interval_s=3600, drift_interval_s=3600)
    controller.start()
    try:
        assert in_pass.wait(10)  # the pass at start
        for _ in range(10):  # ten pushes, by webhook and by the watcher, while it runs
            controller.poke("watch")
            controller.poke("webhook")
        release.set()
        assert controller.wait_idle(passes=2, timeout_s=10)
    finally:
        assert controller.stop(grace_s=10)
    assert seen == ["start", "webhook"] and controller.pokes == 20


def test_a_failing_pass_is_retried_with_growing_delays_and_a_push_retries_at_once() -> None:
    calls: list[tuple[float, str]] = []

    def run_pass(trigger: str) -> PassResult:
        calls.append((time.monotonic(), trigger))
        if len(calls) <= 3:
            raise OSError("connection refused (the database is down)")
        return _ok(trigger)

    controller = Controller(run_pass, poll_interval_s=3600, drift_interval_s=3600, retry_first_s=0.1)
    controller.start()
    try:
        assert controller.wait_idle(passes=4, timeout_s=30)
        assert controller.failures == 0 and controller.last_error is None and controller.last is not None
        gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(calls)]
        assert gaps[0] >= 0.1 and gaps[1] >= 0.3 and gaps[2] >= 0.9  # 0.1 s, then x3 each time
        assert [trigger for _, trigger in calls] == ["start"] * 4  # retried as what it was

        # Failing again, with a long delay ahead: a push does not wait for it.
        calls.clear()
        controller._retry_first_s = 3600  # what the next failure waits
        controller.poke("webhook")
        assert controller.wait_idle(passes=5, timeout_s=10)
        controller.poke("webhook")
        assert controller.wait_idle(passes=6, timeout_s=10)
    finally:
        assert controller.stop(grace_s=10)


def test_while_backing_off_the_poll_keeps_its_interval_but_drift_passes_wait() -> None:
    """A pass that keeps failing (a worker down) backs off up to minutes; a new commit must not wait that long,
    so the poll still runs at its interval. Drift passes (more frequent) wait for the backoff."""
    calls: list[tuple[float, str]] = []

    def run_pass(trigger: str) -> PassResult:
        calls.append((time.monotonic(), trigger))
        return PassResult(trigger, "failed", "a" * 40, f"{trigger}: a worker is down", observed=True)

    controller = Controller(run_pass, poll_interval_s=0.5, drift_interval_s=0.1, retry_first_s=3600)
    controller.start()
    try:
        assert controller.wait_idle(passes=4, timeout_s=10)
    finally:
        assert controller.stop(grace_s=10)
    assert [trigger for _, trigger in calls[:4]] == ["start", "poll", "poll", "poll"]  # no drift pass meanwhile
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(calls[:4])]
    assert all(0.45 <= gap < 10 for gap in gaps), gaps  # the poll interval (0.5 s), not the hour of backoff


def test_stop_waits_for_the_pass_in_flight_and_abandons_it_after_the_grace_period() -> None:
    in_pass, release = threading.Event(), threading.Event()

    def run_pass(trigger: str) -> PassResult:
        in_pass.set()
        release.wait(30)
        return _ok(trigger)

    controller = Controller(run_pass, poll_interval_s=3600, drift_interval_s=3600)
    controller.start()
    assert in_pass.wait(10)
    assert controller.stop(grace_s=0.2) is False  # still applying: left to finish or die with the process
    release.set()
    assert controller.stop(grace_s=10) is True


# -- real passes on the bed ---------------------------------------------------------------------------------


@pytest.fixture
def remote(tmp_path: Path, clean_testbed: Any, standin_image: str, db: Database) -> Remote:
    return Remote(tmp_path, clean_testbed, standin_image)


def test_polling_alone_applies_a_pushed_commit(remote: Remote, db: Database, database_url: str) -> None:
    first = remote.head
    controller = build_controller(remote.settings(database_url, poll_interval_s=1), db, watch=False)
    assert controller is not None
    controller.start()
    try:
        wait_for("the first commit applied", lambda: sync_runs(db) == [("start", "succeeded", first)])
        sha = remote.push("chat", replicas=1)
        wait_for("the push applied", lambda: sync_runs(db) == [("start", "succeeded", first),
                                                               ("poll", "succeeded", sha)])
        assert replica_status(db) == {"chat/0": "ready"}
        assert set(remote.containers()) == {"chat/0"}
        polls = controller.passes
        wait_for("two more polls", lambda: controller.passes >= polls + 2)
        assert len(sync_runs(db)) == 2  # a poll that finds the same commit records nothing
    finally:
        assert controller.stop()


def test_a_push_to_a_watched_local_repository_is_applied_without_waiting_for_a_poll(
        remote: Remote, db: Database, database_url: str) -> None:
    controller = build_controller(remote.settings(database_url), db)  # polls hourly
    assert controller is not None
    controller.start()
    try:
        wait_for("the first commit applied", lambda: len(sync_runs(db)) == 1)
        sha = remote.push("chat", replicas=1)
        wait_for("the push applied", lambda: sync_runs(db)[1:] == [("watch", "succeeded", sha)])
        assert replica_status(db) == {"chat/0": "ready"} and set(remote.containers()) == {"chat/0"}
    finally:
        assert controller.stop()


HOLD = """
import sys, time
from lmstack.config import Settings
from lmstack.reconcile.leader import try_lead
from lmstack.reconcile.records import start_sync_run
from lmstack.state import open_database
database = open_database(Settings(database_url=sys.argv[1]))
with try_lead(database, role="serve") as leadership:
    with database.session() as session:
        start_sync_run(session, revision=None, subject=None, source="x", trigger="poll", plan={})
    print("holding", flush=True)
    time.sleep(600)
"""


def test_two_servers_on_one_database_one_applies_and_the_other_takes_over_when_it_dies(
        remote: Remote, db: Database, database_url: str) -> None:
    settings = remote.settings(database_url)
    servers = [build_controller(settings, db, watch=False) for _ in range(2)]
    assert servers[0] is not None and servers[1] is not None
    a, b = servers[0], servers[1]
    for server in (a, b):
        server.start()
    try:
        assert a.wait_idle(passes=1, timeout_s=120) and b.wait_idle(passes=1, timeout_s=120)
        first = remote.head
        assert sync_runs(db) == [("start", "succeeded", first)]  # one of them applied; the other had nothing to do

        sha = remote.push("chat", replicas=2)
        a.poke("webhook")
        b.poke("webhook")
        assert a.wait_idle(passes=2, timeout_s=120) and b.wait_idle(passes=2, timeout_s=120)
        assert sync_runs(db)[1:] == [("webhook", "succeeded", sha)]
        outcomes = sorted(str(server.last.outcome) for server in (a, b) if server.last is not None)
        assert outcomes in (["applied", "skipped"], ["applied", "unchanged"])
        assert replica_status(db) == {"chat/0": "ready", "chat/1": "ready"}
        assert sorted(remote.containers()) == ["chat/0", "chat/1"]  # no duplicates

        # A third server holds the lock (as if applying) and dies: b skips while it lives, then takes over.
        holder = subprocess.Popen([sys.executable, "-c", HOLD, database_url], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
            sha = remote.push("chat", replicas=1, message="chat: one replica")
            b.poke("webhook")
            assert b.wait_idle(passes=3, timeout_s=60)
            assert b.last is not None and b.last.outcome == "skipped" and f"pid {holder.pid}" in b.last.summary
            assert replica_status(db) == {"chat/0": "ready", "chat/1": "ready"}
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
        wait_for("the dead holder's lock released", lambda: current_holder(db) is None, timeout_s=30)
        b.poke("webhook")
        wait_for("b applied the push", lambda: sync_runs(db)[3:] == [("webhook", "succeeded", sha)])
        assert sync_runs(db)[2][1] == "failed"  # the dead holder's run, finished as interrupted
        assert replica_status(db) == {"chat/0": "ready"}
        assert sorted(remote.containers()) == ["chat/0"]
    finally:
        assert a.stop() and b.stop()
    with db.session() as session:
        from lmstack.state import SyncRun
        assert session.get(SyncRun, 3).error == INTERRUPTED


def test_lmstack_serve_runs_the_controller_and_stops_it_cleanly(remote: Remote, db: Database,
                                                                database_url: str) -> None:
    env = {"LMSTACK_DATABASE_URL": database_url, "LMSTACK_HOME": str(remote.home), "LMSTACK_REPO": remote.url,
           "LMSTACK_REF": "main", "LMSTACK_SSH_KEY": str(remote.bed.ssh_key),
           "LMSTACK_KNOWN_HOSTS": str(remote.bed.known_hosts), "LMSTACK_MOUNT_ROOTS": MODELS,
           "LMSTACK_POLL_INTERVAL_S": "1", "LMSTACK_DRIFT_INTERVAL_S": "3600"}
    with ServeProcess(env) as server:
        first = remote.head
        wait_for("the first commit applied", lambda: sync_runs(db) == [("start", "succeeded", first)])
        sha = remote.push("chat", replicas=1)
        wait_for("the push applied", lambda: sync_runs(db)[1:] in ([("poll", "succeeded", sha)],
                                                                   [("watch", "succeeded", sha)]))
        assert server.process is not None
        server.process.terminate()
        server.process.wait(60)  # uvicorn re-raises SIGTERM once it has shut down: the code is -15 either way
        log = server.log_tail()
        assert "controller: applying" in log and "Application shutdown complete" in log
        assert "abandoned" not in log
    assert replica_status(db) == {"chat/0": "ready"}

    # Without the SSH files the controller needs, the server says so and does not start.
    missing = {**env, "LMSTACK_SSH_KEY": str(remote.home / "no-such-key")}
    with pytest.raises(RuntimeError, match="no-such-key does not exist"):
        ServeProcess(missing).__enter__()


def test_passes_between_fact_gatherings_still_repair_drift(remote: Remote, db: Database, database_url: str) -> None:
    """Facts (Ansible on every worker, most of a pass) are gathered every facts_interval_s and when the commit
    names a new worker; the passes in between plan on the stored facts but still list the containers, so a
    container removed by hand is recreated by the next drift pass."""
    from lmstack.state import Worker

    def gathered_at() -> dict[str, object]:
        with db.session() as session:
            return {w.name: w.facts_at for w in session.scalars(select(Worker))}

    runner = PassRunner(remote.settings(database_url, facts_interval_s=3600), db,
                        ssh_files(remote.settings(database_url)))
    sha = remote.push("chat", replicas=1)
    first = runner.run("webhook")
    assert (first.outcome, first.revision) == ("applied", sha), first.summary
    facts_at = gathered_at()
    assert facts_at and all(facts_at.values())

    host = remote.containers()["chat/0"]
    remote.bed.docker(host, "rm", "-f", "lmstack-chat-0")
    repaired = runner.run("drift")
    assert repaired.outcome == "applied" and "1 recreated" in repaired.summary, repaired.summary
    assert set(remote.containers()) == {"chat/0"} and replica_status(db) == {"chat/0": "ready"}
    assert gathered_at() == facts_at  # planned on the stored facts: no Ansible run

    again = PassRunner(remote.settings(database_url, facts_interval_s=0), db, ssh_files(remote.settings(database_url)))
    assert again.run("drift").outcome == "unchanged"
    assert all(gathered_at()[name] > facts_at[name] for name in facts_at)  # interval 0: every pass gathers


def test_a_database_outage_makes_the_controller_wait_and_retry_not_exit(remote: Remote, throwaway_postgres: Any
                                                                         ) -> None:
    """The controller's database stops (a restart, a failover) while it runs: passes fail and are retried,
    the thread stays up, and once the database is back the next pass applies what was pushed meanwhile."""
    from lmstack.state import open_database

    settings = remote.settings(throwaway_postgres.url, drift_interval_s=0.5)
    database = open_database(settings)  # migrated
    try:
        controller = build_controller(settings, database, watch=False, retry_first_s=0.2)
        assert controller is not None
        controller.start()
        try:
            first = remote.head
            wait_for("the first commit applied", lambda: sync_runs(database) == [("start", "succeeded", first)])
            throwaway_postgres.stop()
            sha = remote.push("chat", replicas=1)
            controller.poke("webhook")
            wait_for("a pass to fail on the database", lambda: controller.failures >= 2, timeout_s=60)
            assert controller.last_error is not None
            throwaway_postgres.start()
            wait_for("the push applied once the database is back",
                     lambda: ("webhook", "succeeded", sha) in sync_runs(database)
                     or ("drift", "succeeded", sha) in sync_runs(database), timeout_s=120)
            assert replica_status(database) == {"chat/0": "ready"} and set(remote.containers()) == {"chat/0"}
            assert controller.failures == 0
        finally:
            assert controller.stop(grace_s=30)
    finally:
        database.close()
