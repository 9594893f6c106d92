"""One applier at a time across every process sharing the database: a PostgreSQL session advisory lock.

The lock lives on a connection of its own, opened for as long as the holder applies and closed after: a
holder that dies (SIGKILL, lost host) loses its connection and with it the lock, so no lease can go stale.
Who holds it is the connection's `application_name` (role, pid, host, since), read back through pg_locks and
pg_stat_activity: it disappears with the connection too, so it never names a dead holder.

    with try_lead(database, role="serve") as leadership:    # the controller: skip this pass if held
        if leadership is None: ...                          # another process applies
    with lead(database, role="apply", on_wait=say) as leadership:   # the CLI: wait, saying who holds it

On taking the lock, any sync run still `running` belongs to a process that stopped mid-apply (the holder
would still hold the lock otherwise): it is finished as failed, "interrupted (...)".

Limit: a holder whose own connection breaks while it applies (the database restarted) loses the lock
without noticing until it next talks to the database; another process may start applying meanwhile.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, text, update

from lmstack.state import Database, SyncRun

# Arbitrary, fixed, distinct from the migration lock (state/db.py): "lmsldr" in ASCII.
LEADER_LOCK_KEY = 0x6C6D736C6472
INTERRUPTED = "interrupted (the process applying it stopped)"
_PREFIX = "lmstack"
_NAME_LIMIT = 63  # PostgreSQL keeps at most NAMEDATALEN - 1 bytes of application_name


@dataclass(frozen=True)
class Holder:
    """Who holds the lock: what `lmstack apply` prints while it waits."""

    role: str  # "serve" (a controller) or "apply" (the CLI)
    pid: int
    host: str  # cut to fit application_name; may be shortened
    since: datetime

    def __str__(self) -> str:
        return f"lmstack {self.role} (pid {self.pid} on {self.host}, since {self.since:%Y-%m-%d %H:%M:%S} UTC)"


@dataclass(frozen=True)
class Leadership:
    holder: Holder
    interrupted_runs: tuple[int, ...]  # sync runs found `running` and finished as interrupted


def current_holder(database: Database) -> Holder | None:
    """The holder now, or None (nobody, or a holder that is not lmstack's: then it is unnamed)."""
    with database.engine.connect() as conn:
        return _holder(conn)


@contextmanager
def try_lead(database: Database, *, role: str) -> Iterator[Leadership | None]:
    """Take the lock if it is free (Leadership), else yield None at once; released when the block ends."""
    conn = _connect(database)
    try:
        if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK_KEY}).scalar_one():
            yield None
            return
        yield _took(database, conn, role)
    finally:
        _close(conn)


@contextmanager
def lead(database: Database, *, role: str, on_wait: Callable[[Holder | None], None] | None = None,
         poll_s: float = 0.5) -> Iterator[Leadership]:
    """Take the lock, waiting as long as another process holds it. `on_wait(holder)` is called when the wait
    starts and whenever the holder changes (None: a holder that could not be named)."""
    conn = _connect(database)
    try:
        told: Holder | bool | None = False  # False: nothing said yet
        while not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK_KEY}).scalar_one():
            # Polled rather than pg_advisory_lock: the waiter can say who it waits for, and a ^C is prompt.
            holder = _holder(conn)
            if on_wait is not None and holder != told:
                on_wait(holder)
            told = holder
            time.sleep(poll_s)
        yield _took(database, conn, role)
    finally:
        _close(conn)


# -- the dedicated connection -----------------------------------------------------------------------------


def _connect(database: Database) -> Connection:
    # AUTOCOMMIT: the session lock needs no transaction, and one left open would hold back vacuum for as long
    # as an apply lasts.
    return database.engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def _close(conn: Connection) -> None:
    # Invalidated, not returned to the pool: closing the connection is what releases the lock (and its name),
    # even if an unlock would fail.
    conn.invalidate()
    conn.close()


def _took(database: Database, conn: Connection, role: str) -> Leadership:
    holder = Holder(role=role, pid=os.getpid(), host=socket.gethostname(),
                    since=datetime.now(UTC).replace(microsecond=0))
    name = f"{_PREFIX} {holder.role} {holder.pid} {int(holder.since.timestamp())} "
    name += holder.host[: max(0, _NAME_LIMIT - len(name.encode()))]
    conn.execute(text("SELECT set_config('application_name', :name, false)"), {"name": name})
    with database.session() as session:
        stale = session.scalars(update(SyncRun).where(SyncRun.status == "running")
                                .values(status="failed", error=INTERRUPTED, finished_at=datetime.now(UTC))
                                .returning(SyncRun.id)).all()
    return Leadership(holder=holder, interrupted_runs=tuple(sorted(stale)))


def _holder(conn: Connection) -> Holder | None:
    name = conn.execute(text(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.classid::bigint = :high AND l.objid::bigint = :low "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
        {"high": LEADER_LOCK_KEY >> 32, "low": LEADER_LOCK_KEY & 0xFFFFFFFF}).scalar()
    return _parse(name) if name else None


def _parse(name: str) -> Holder | None:
    parts = name.split(" ", 4)
    if len(parts) != 5 or parts[0] != _PREFIX or not parts[2].isdigit() or not parts[3].isdigit():
        return None
    return Holder(role=parts[1], pid=int(parts[2]), host=parts[4], since=datetime.fromtimestamp(int(parts[3]), UTC))
