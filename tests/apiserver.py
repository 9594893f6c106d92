"""Helpers for API tests: a live uvicorn server in a thread, users, and login tokens."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from lmstack.api.security import hash_password, issue_token
from lmstack.api.server import server_config
from lmstack.config import Settings
from lmstack.state import Database, User

SECRET = "lmstack-test-secret-0123456789abcdef0123456789"


def add_user(database: Database, name: str, role: str) -> str:
    """A user row and a login token for it (the auth routes are not needed to get one)."""
    with database.session() as session:
        session.add(User(name=name, password_hash=hash_password("not-used-here"), role=role))
    token, _ = issue_token(SECRET, user=name, role=role, ttl_s=3600)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class LiveServer:
    """`with LiveServer(app) as server:` uvicorn serving `app` on 127.0.0.1 (a free port) in a thread; with
    `settings`, configured as `lmstack serve` configures it (its connection limits: api/server.py)."""

    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        options: dict[str, Any] = {"log_level": "warning", "lifespan": "on", "ws_ping_interval": None}
        config = uvicorn.Config(app, **options) if settings is None else server_config(app, settings, **options)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True,
                                        name="live-uvicorn")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        self._socket.close()


class ServeProcess:
    """`with ServeProcess(env) as server:` a real `lmstack serve` (run by `python`) in a process of its own on
    127.0.0.1 (a free port), with the LMSTACK_* settings in `env`, started with an open-files soft limit of
    `open_files` (what a login shell gives it; the server raises it itself). Waits until /healthz answers.
    `workers`: its server processes (LMSTACK_WORKERS; None: the default, one per core)."""

    def __init__(self, env: dict[str, str], *, open_files: int = 1024, python: str = sys.executable,
                 workers: int | None = None) -> None:
        self.python = python  # the interpreter (and so the lmstack) that runs the server
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.env = {**os.environ, **env, "LMSTACK_HOST": "127.0.0.1", "LMSTACK_PORT": str(self.port)}
        if workers is not None:
            self.env["LMSTACK_WORKERS"] = str(workers)
        self.open_files = open_files
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__) not a pipe: a full one stalls the server

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _limit(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(self.open_files, hard), hard))

    def __enter__(self) -> ServeProcess:
        # cwd "/": `python -m` puts its working directory first on sys.path, which must not pick the package.
        self.process = subprocess.Popen([self.python, "-m", "lmstack", "serve"], env=self.env, cwd="/",
                                        preexec_fn=self._limit, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lmstack serve exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if conn.recv(64).startswith(b"HTTP/1.1 200"):
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError("lmstack serve did not answer /healthz within 30 s")

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()


def raise_own_open_files_limit() -> None:
    """The test process opens many connections too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
