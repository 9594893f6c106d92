"""The supervisor of `lmstack serve --workers N` (N > 1): one listening socket, the hub, the controller, and
N server processes that it keeps running (see the package doc)."""

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


def run_workers(settings: Settings, database: Database, controller: Controller | None, *, host: str, port: int,
                workers: int, access_log: bool) -> bool:
    """Serve with `workers` processes until SIGINT/SIGTERM. False when it could not start."""
    try:
        held = _hold(host, port)
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

        def start_one() -> BaseProcess:
            process = spawn.Process(target=serve_one, name="lmstack-serve", daemon=False,
                                    args=(their_settings, host, port, directory / "hub.sock", access_log))
            process.start()
            return process

        processes = [start_one() for _ in range(workers)]
        shown = f"[{host}]" if ":" in host else host
        log.info("lmstack API starting on http://%s:%d with %d server processes (gateway /v1, status /api, "
                 "/metrics, /healthz)", shown, port, workers)
        while not stop.wait(0.5):
            for index, process in enumerate(processes):
                if process.is_alive():
                    continue
                if process.exitcode == STARTUP_FAILED:
                    log.error("a server process could not start (its log is above); stopping")
                    failed = True
                    stop.set()
                    break
                log.warning("server process %s ended (exit status %s); starting another", process.pid,
                            process.exitcode)
                processes[index] = start_one()
    finally:
        _stop(processes)
        if controller is not None:
            controller.stop()
        hub.stop()
        held.close()
        shutil.rmtree(directory, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return not failed


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _hold(host: str, port: int) -> socket.socket:
    """The port, bound (not listening) with SO_REUSEPORT: a port another program listens on fails here, with
    one clear message, and none can take it while the processes start."""
    held = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((host, port))
    except OSError:
        held.close()
        raise
    return held


def _listen(host: str, port: int) -> socket.socket:
    """This process's own listening socket on the shared port. With SO_REUSEPORT the kernel spreads new
    connections over the processes' sockets by address hash; one socket accepted by all of them would let
    whichever process wakes first take a whole burst."""
    return socket.create_server((host, port), family=_family(host), backlog=BACKLOG, reuse_port=True)


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


def serve_one(settings: Settings, host: str, port: int, hub: Path, access_log: bool) -> None:
    """One server process (spawned: a fresh interpreter)."""
    os.setpgrp()  # Ctrl-C in a terminal reaches the supervisor alone; it stops the processes once, in order
    _end_with_parent()
    configure_logging()
    raise_open_files_limit()
    listener = _listen(host, port)
    database = open_database(settings, migrate=False)
    try:
        app = create_app(settings, database=database, hub=hub)
        server = uvicorn.Server(server_config(app, settings, log_config=None, access_log=access_log,
                                              ws_ping_interval=20.0, ws_ping_timeout=20.0))
        tune_gc()
        server.run(sockets=[listener])
    finally:
        database.close()
        listener.close()
    sys.exit(0 if server.started else STARTUP_FAILED)
