"""Helpers for API tests: a live uvicorn server in a thread, users, and login tokens."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn

from lmstack.api.security import hash_password, issue_token
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
    """`with LiveServer(app) as server:` uvicorn serving `app` on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app: Any) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="on", ws_ping_interval=None)
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
