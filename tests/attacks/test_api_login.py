"""Finding 6: login limiting per user let an unauthenticated attacker lock the admin out from every address;
60 concurrent wrong passwords got 41 password checks (not 5), and argon2 (64 MiB a check) grew the server
from 153 MB to 1.1 GB. Real servers, real concurrent requests, each from its own source address (127/8)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil
import pytest
from apiserver import SECRET, LiveServer, ServeProcess

from lmstack.api import security
from lmstack.api.app import create_app
from lmstack.api.security import hash_password
from lmstack.config import Settings
from lmstack.state import Database, User

PASSWORD = "the admin's own password"
ATTEMPTS = 5


def _login(url: str, address: str, user: str, password: str) -> int:
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=60) as client:
        return client.post(f"{url}/api/auth/login", json={"username": user, "password": password}).status_code


def _add_admin(db: Database) -> None:
    with db.session() as session:
        session.add(User(name="root", password_hash=hash_password(PASSWORD), role="admin"))


class _Spy:
    """The real argon2 hasher, counting verifications and how many run at once."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.checks = 0
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    def hash(self, password: str) -> str:
        return str(self.real.hash(password))

    def verify(self, password_hash: str, password: str) -> bool:
        with self.lock:
            self.checks += 1
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return bool(self.real.verify(password_hash, password))
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def server(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LiveServer, _Spy]]:
    _add_admin(db)
    spy = _Spy(security._hasher)
    monkeypatch.setattr(security, "_hasher", spy)
    settings = Settings(jwt_secret=SECRET, login_attempts=ATTEMPTS, repo=None)
    with LiveServer(create_app(settings, database=db), settings) as live:
        yield live, spy


def test_attackers_on_other_addresses_cannot_lock_the_admin_out(server: tuple[LiveServer, _Spy]) -> None:
    live, _ = server
    stop = threading.Event()
    answers: list[int] = []

    def hammer(address: str) -> None:
        while not stop.is_set():
            answers.append(_login(live.url, address, "root", "a wrong guess"))

    attackers = [threading.Thread(target=hammer, args=(f"127.0.0.{i}",)) for i in (2, 3, 4, 5)]
    for thread in attackers:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while answers.count(429) < 20 and time.monotonic() < deadline:  # the attack is being refused by now
            time.sleep(0.05)
        assert answers.count(429) >= 20
        # The admin, from their own address, in the middle of the attack: in at the first try, every time.
        assert [_login(live.url, "127.0.0.9", "root", PASSWORD) for _ in range(3)] == [200, 200, 200]
    finally:
        stop.set()
        for thread in attackers:
            thread.join(60)
    assert 401 in answers


def test_concurrent_wrong_passwords_are_counted_before_they_are_checked(server: tuple[LiveServer, _Spy]) -> None:
    live, spy = server
    with ThreadPoolExecutor(60) as pool:
        answers = list(pool.map(lambda _: _login(live.url, "127.0.0.7", "root", "a wrong guess"), range(60)))
    assert spy.checks <= ATTEMPTS, answers
    assert answers.count(401) == spy.checks and set(answers) <= {401, 429, 503}
    assert spy.most <= 2  # LMSTACK_LOGIN_CONCURRENCY


def test_argon2_memory_stays_bounded_under_a_burst_of_logins(database_url: str, db: Database,
                                                             tmp_path: Any) -> None:
    """60 concurrent logins, each from its own address and for its own user (so no count refuses them):
    only `login_concurrency` run argon2 at once; beyond a short queue the rest get 503 at once."""
    _add_admin(db)
    env = {"LMSTACK_DATABASE_URL": database_url, "LMSTACK_JWT_SECRET": SECRET, "LMSTACK_HOME": str(tmp_path)}
    with ServeProcess(env) as serve:
        process = psutil.Process(serve.process.pid)  # type: ignore[union-attr]
        _login(serve.url, "127.0.0.1", "root", PASSWORD)  # warmed up: one check's memory is already counted
        before = process.memory_info().rss
        peak = [before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()

        def call(i: int) -> int:
            return _login(serve.url, f"127.0.1.{i + 1}", f"user{i}", "a wrong guess")

        try:
            with ThreadPoolExecutor(60) as pool:
                answers = list(pool.map(call, range(60)))
        finally:
            sampling.set()
            sampler.join()
        grew_mb = (peak[0] - before) / 2**20
        assert grew_mb < 300, f"the server grew by {grew_mb:.0f} MB"
        assert set(answers) <= {401, 503} and answers.count(503) >= 30, answers
