"""The supervisor of `lmstack serve --workers N` (N > 1): a listening socket per process, the hub, the
controller, and N server processes that it keeps running (see the package doc)."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvicorn

from lmstack.api.app import create_app
from lmstack.api.hub.server import Hub
from lmstack.api.server import configure_logging, raise_open_files_limit, server_config, tune_gc
from lmstack.config import Settings
from lmstack.controller import Controller
from lmstack.state import Database, open_database

log = logging.getLogger("lmstack.api")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STARTUP_FAILED = 3  # a server process's exit status when it never served (the app failed to start)
STOP_GRACE_S = 30.0  # how long the processes get to finish what they serve once told to stop
BACKLOG = 2048
QUICK_END_S = 10.0  # a process that ends sooner than this after its start is restarted after a growing delay ...
MAX_RESTART_DELAY_S = 30.0  # ... of at most this (the database down when it starts, say)


def run_workers(settings: Settings, database: Database, controller: Controller | None, *, host: str, port: int,
                workers: int, access_log: bool) -> bool:
    """Serve with `workers` processes until SIGINT/SIGTERM. False when it could not start."""
    try:
        sockets = _listen(host, port, workers)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", host, port, exc.strerror or exc)
        return False
    directory = Path(tempfile.mkdtemp(prefix="lmstack-hub-"))  # 0700: only this user reaches the hub
    hub = Hub(settings, database, poke=controller.poke if controller is not None else None)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    # The processes reach the database the supervisor opened (the embedded one included) without migrating.
    their_settings = settings.model_copy(
        update={"database_url": database.engine.url.render_as_string(hide_password=False)})
    spawn = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = []
    failed = False
    try:
        hub.start(directory / "hub.sock")
        if controller is not None:
            controller.start()

        def start_one(index: int) -> BaseProcess:
            process = spawn.Process(target=serve_one, name="lmstack-serve", daemon=False,
                                    args=(their_settings, sockets[index], directory / "hub.sock", access_log,
                                          workers))
            process.start()
            return process

        processes = [start_one(index) for index in range(workers)]
        shown = f"[{host}]" if ":" in host else host
        log.info("lmstack API starting on http://%s:%d with %d server processes (gateway /v1, status /api, "
                 "/metrics, /healthz)", shown, port, workers)
        born = [time.monotonic()] * workers
        quick_ends = [0] * workers  # in a row, per slot: a process that keeps dying is restarted ever later
        replace_at: list[float | None] = [None] * workers
        while not stop.wait(0.5):
            now = time.monotonic()
            for index, process in enumerate(processes):
                due = replace_at[index]
                if due is not None:
                    if now >= due:
                        processes[index], born[index], replace_at[index] = start_one(index), now, None
                    continue
                if process.is_alive():
                    continue
                if process.exitcode == STARTUP_FAILED:
                    log.error("a server process could not start (its log is above); stopping")
                    failed = True
                    stop.set()
                    break
                quick_ends[index] = quick_ends[index] + 1 if now - born[index] < QUICK_END_S else 0
                delay = min(MAX_RESTART_DELAY_S, 2.0 ** quick_ends[index]) if quick_ends[index] else 0.0
                log.warning("server process %s ended (exit status %s); starting another%s", process.pid,
                            process.exitcode, f" in {delay:.0f} s" if delay else "")
                replace_at[index] = now + delay
    finally:
        _stop(processes)
        if controller is not None:
            controller.stop()
        hub.stop()
        for listener in sockets:
            listener.close()
        shutil.rmtree(directory, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return not failed


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _listen(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on the port, one per server process, with SO_REUSEPORT: the kernel spreads new
    connections over them by address hash (one socket accepted by every process would let whichever wakes
    first take a whole burst). Made here, not in the processes, so that the port is held from the start and
    a connection that arrives while a process (re)starts waits in its socket's queue."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_server((host, port), family=_family(host), backlog=BACKLOG,
                                                reuse_port=True))
    except OSError:
        for listener in sockets:
            listener.close()
        raise
    return sockets


def _stop(processes: list[BaseProcess]) -> None:
    """SIGTERM (uvicorn finishes what it serves), then SIGKILL for those still running after STOP_GRACE_S."""
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("server process %s did not stop in %.0f s; killing it", process.pid, STOP_GRACE_S)
            process.kill()
            process.join()


def _end_with_parent() -> None:
    """SIGTERM this process when the supervisor dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG), so the port
    is free for the next server at once. The hub connection ending does the same where this is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def serve_one(settings: Settings, listener: socket.socket, hub: Path, access_log: bool, processes: int) -> None:
    """One server process (spawned: a fresh interpreter)."""
    os.setpgrp()  # Ctrl-C in a terminal reaches the supervisor alone; it stops the processes once, in order
    _end_with_parent()
    configure_logging()
    raise_open_files_limit()
    database = open_database(settings, migrate=False)
    try:
        app = create_app(settings, database=database, hub=hub)
        server = uvicorn.Server(server_config(app, settings, processes=processes, log_config=None,
                                              access_log=access_log,
                                              ws_ping_interval=20.0, ws_ping_timeout=20.0))
        tune_gc()
        server.run(sockets=[listener])
    finally:
        database.close()
    sys.exit(0 if server.started else STARTUP_FAILED)
