"""The leader lock (lmstack/reconcile/leader.py) on a real PostgreSQL: one holder at a time across processes,
the holder named to whoever waits, released when its process dies, and a sync run a dead holder left
`running` finished as interrupted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import select

from lmstack.reconcile.leader import INTERRUPTED, Holder, current_holder, lead, try_lead
from lmstack.state import Database, SyncRun

T = TypeVar("T")

HOLD = """
import sys, time
from lmstack.config import Settings
from lmstack.reconcile.leader import try_lead
from lmstack.reconcile.records import start_sync_run
from lmstack.state import open_database
database = open_database(Settings(database_url=sys.argv[1]))
with try_lead(database, role="apply") as leadership:
    assert leadership is not None
    with database.session() as session:  # as if it had started applying
        run = start_sync_run(session, revision="a" * 40, subject="s", source="fleet", trigger="cli", plan={})
    print(run, flush=True)
    time.sleep(600)
"""


def _wait(what: str, check: Callable[[], T], timeout_s: float = 30) -> T:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def test_one_holder_at_a_time_and_a_waiter_is_told_who_holds_it(db: Database) -> None:
    assert current_holder(db) is None
    with try_lead(db, role="serve") as first:
        assert first is not None and first.interrupted_runs == ()
        holder = current_holder(db)
        assert holder == first.holder
        assert (holder.role, holder.pid) == ("serve", os.getpid()) and holder.host
        assert socket.gethostname().startswith(holder.host)  # cut to fit application_name (63 bytes)
        with try_lead(db, role="serve") as second:  # another connection, as another server would be
            assert second is None

        told: list[Holder | None] = []
        took = threading.Event()

        def cli_apply() -> None:
            with lead(db, role="apply", on_wait=told.append, poll_s=0.05) as leadership:
                assert leadership.holder.role == "apply"
                took.set()

        waiter = threading.Thread(target=cli_apply)
        waiter.start()
        _wait("the waiter to say who it waits for", lambda: told)
        assert told == [first.holder] and not took.is_set()
    waiter.join(10)
    assert took.is_set() and told == [first.holder]  # told once, not at every poll
    assert current_holder(db) is None  # released when the block ended


def test_a_killed_holder_loses_the_lock_and_its_running_sync_run_is_marked_interrupted(
        db: Database, database_url: str) -> None:
    other = subprocess.Popen([sys.executable, "-c", HOLD, database_url], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None
        run_id = int(other.stdout.readline())
        holder = current_holder(db)
        assert holder is not None and (holder.role, holder.pid) == ("apply", other.pid)
        with try_lead(db, role="serve") as leadership:
            assert leadership is None  # it applies; this one skips
        with db.session() as session:
            assert session.get(SyncRun, run_id).status == "running"  # not touched while its holder lives
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait(10)

    def take() -> tuple[int, ...] | None:
        with try_lead(db, role="serve") as leadership:
            return None if leadership is None else leadership.interrupted_runs
    # The server notices the dead client's connection at once on a local socket; allow for a slower one.
    assert _wait("the lock to be free", take) == (run_id,)
    with db.session() as session:
        run = session.scalars(select(SyncRun)).one()
        assert (run.status, run.error) == ("failed", INTERRUPTED) and run.finished_at is not None
    with try_lead(db, role="serve") as leadership:  # finished once: nothing to mark the next time
        assert leadership is not None and leadership.interrupted_runs == ()
