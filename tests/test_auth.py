"""Auth: users and login (JWT), API keys over HTTP and the CLI, key verification and its cache, rate limits.

Against the real PostgreSQL (the `db` fixture) and the real app, lifespan included.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import argon2
import httpx
import jwt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, select, update
from typer.testing import CliRunner, Result

from lmstack.api import security
from lmstack.api.app import create_app
from lmstack.api.services import keys as keys_service
from lmstack.api.services.keys import KeyCache, KeyInfo, create_key, revoke_key
from lmstack.api.services.limits import LocalLimits
from lmstack.api.services.ratelimit import ADDRESS_FACTOR, USER_FACTOR, KeyRateLimiter, LoginLimiter, Throttled
from lmstack.api.services.users import (
    InvalidUser,
    UserExists,
    create_user,
    list_users,
    set_disabled,
)
from lmstack.cli.main import app as cli_app
from lmstack.config import Settings
from lmstack.state import ApiKey, Database, User

SECRET = "test-jwt-secret-" + "0123456789abcdef" * 4
PASSWORD = "correct horse battery"
ATTEMPTS = 3


# -- helpers ---------------------------------------------------------------------------------------


def _settings(**overrides: Any) -> Settings:
    return Settings(jwt_secret=SECRET, login_attempts=ATTEMPTS, **overrides)


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(), database=db)) as test_client:
        yield test_client


def add_user(db: Database, name: str, *, role: str = "viewer", disabled: bool = False) -> None:
    with db.session() as session:
        create_user(session, name=name, password=PASSWORD, role=role)  # type: ignore[arg-type]
        if disabled:
            set_disabled(session, name=name, disabled=True)


def add_key(db: Database, user: str, **options: Any) -> str:
    with db.session() as session:
        return create_key(session, user=user, name=options.pop("name", "test"), **options).token


def login(client: TestClient, name: str, password: str = PASSWORD) -> str:
    response = client.post("/api/auth/login", json={"username": name, "password": password})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_for_status(client: TestClient, token: str, status: int, *, limit_s: float = 3.0) -> float:
    """Poll GET /api/auth/me until it answers `status`; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if client.get("/api/auth/me", headers=auth(token)).status_code == status:
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"/api/auth/me did not answer {status} within {limit_s} s")


@contextmanager
def count_statements(db: Database) -> Iterator[list[str]]:
    """The SQL statements run on the engine inside the block."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


def _is(kind: str) -> Callable[[str], bool]:
    return lambda statement: statement.lstrip().upper().startswith(kind)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[Callable[[str], httpx.AsyncClient]]:
    """The app with its lifespan; yields a factory of clients that connect from a given IP address."""
    clients: list[httpx.AsyncClient] = []

    def from_ip(ip: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(ip, 40000)),
                                   base_url="http://lmstack")
        clients.append(client)
        return client

    async with app.router.lifespan_context(app):
        try:
            yield from_ip
        finally:
            for client in clients:
                await client.aclose()


# -- users and login -------------------------------------------------------------------------------


def test_there_is_no_default_account(db: Database, client: TestClient) -> None:
    with db.session() as session:
        assert list_users(session) == []
    for name, password in (("admin", "admin"), ("admin", "password"), ("lmstack", "lmstack")):  # ATTEMPTS
        assert client.post("/api/auth/login", json={"username": name, "password": password}).status_code == 401


def test_user_rules(db: Database) -> None:
    with db.session() as session:
        with pytest.raises(InvalidUser, match="at least 12"):
            create_user(session, name="alice", password="short-pw", role="admin")
        with pytest.raises(InvalidUser, match="invalid user name"):
            create_user(session, name="al ice", password=PASSWORD, role="admin")
        user = create_user(session, name="alice", password=PASSWORD, role="admin")
        with pytest.raises(UserExists):
            create_user(session, name="alice", password=PASSWORD, role="viewer")
    with db.session() as session:
        row = session.scalars(select(User)).one()
    assert user.role == "admin" and not user.disabled
    assert row.password_hash.startswith("$argon2id$") and PASSWORD not in row.password_hash


def test_login_gives_an_hs256_token(db: Database, client: TestClient) -> None:
    add_user(db, "alice", role="admin")
    before = datetime.now(UTC)
    response = client.post("/api/auth/login", json={"username": "alice", "password": PASSWORD})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert jwt.get_unverified_header(body["access_token"])["alg"] == "HS256"
    expires = datetime.fromisoformat(body["expires_at"])
    assert timedelta(seconds=3590) < expires - before < timedelta(seconds=3610)
    me = client.get("/api/auth/me", headers=auth(body["access_token"]))
    assert me.status_code == 200
    assert me.json() == {"user": "alice", "role": "admin", "via": "login", "key_id": None}


def test_wrong_password_and_unknown_user_answer_alike(db: Database, client: TestClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    add_user(db, "alice")
    verifications: list[str] = []
    real = security._hasher

    class Spy:
        def hash(self, password: str) -> str:
            return real.hash(password)

        def verify(self, password_hash: str, password: str) -> bool:
            verifications.append(password_hash)
            return real.verify(password_hash, password)

    monkeypatch.setattr(security, "_hasher", Spy())
    wrong = client.post("/api/auth/login", json={"username": "alice", "password": "not the password"})
    assert len(verifications) == 1
    unknown = client.post("/api/auth/login", json={"username": "nobody", "password": "not the password"})
    assert len(verifications) == 2
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["error"]["message"] == "wrong user name or password"
    # The same cost: one argon2 verification each, and the dummy hash has the real hashes' parameters.
    with db.session() as session:
        stored = session.scalars(select(User.password_hash)).one()
    assert verifications == [stored, security._DUMMY_HASH]
    assert argon2.extract_parameters(stored) == argon2.extract_parameters(security._DUMMY_HASH)


def test_disabled_user_cannot_log_in_and_loses_sessions(db: Database, client: TestClient) -> None:
    add_user(db, "alice")
    add_user(db, "mallory", disabled=True)
    refused = client.post("/api/auth/login", json={"username": "mallory", "password": PASSWORD})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "user_disabled"
    token = login(client, "alice")
    wait_for_status(client, token, 200)
    with db.session() as session:
        set_disabled(session, name="alice", disabled=True)
    assert wait_for_status(client, token, 401) < 1.5  # the token still has an hour to run


def test_failed_logins_are_limited_per_user_and_address(db: Database) -> None:
    add_user(db, "alice")
    add_user(db, "bob")

    async def scenario() -> None:
        async with running(create_app(_settings(), database=db)) as from_ip:
            guesser = from_ip("10.0.0.1")
            for _ in range(ATTEMPTS):
                wrong = await guesser.post("/api/auth/login", json={"username": "alice", "password": "guess " * 3})
                assert wrong.status_code == 401
            locked = await guesser.post("/api/auth/login", json={"username": "alice", "password": PASSWORD})
            assert locked.status_code == 429
            assert locked.json()["error"]["type"] == "rate_limit_error"
            assert 1 <= int(locked.headers["Retry-After"]) <= 60
            # Neither alice from elsewhere nor another user from there is locked out.
            elsewhere = await from_ip("10.0.1.1").post("/api/auth/login",
                                                       json={"username": "alice", "password": PASSWORD})
            assert elsewhere.status_code == 200
            other = await guesser.post("/api/auth/login", json={"username": "bob", "password": PASSWORD})
            assert other.status_code == 200

    asyncio.run(scenario())


def test_failed_logins_are_limited_per_address(db: Database) -> None:
    add_user(db, "bob")

    async def scenario() -> None:
        async with running(create_app(_settings(), database=db)) as from_ip:
            attacker = from_ip("192.0.2.7")
            for i in range(ATTEMPTS * ADDRESS_FACTOR):  # a different (unknown) user each time
                wrong = await attacker.post("/api/auth/login", json={"username": f"user{i}", "password": "guess"})
                assert wrong.status_code == 401
            blocked = await attacker.post("/api/auth/login", json={"username": "bob", "password": PASSWORD})
            assert blocked.status_code == 429 and "Retry-After" in blocked.headers
            fine = await from_ip("192.0.2.8").post("/api/auth/login", json={"username": "bob", "password": PASSWORD})
            assert fine.status_code == 200

    asyncio.run(scenario())


def test_a_good_login_resets_the_pairs_count_and_the_window_passes(db: Database) -> None:
    add_user(db, "alice")

    async def scenario() -> None:
        app = create_app(_settings(), database=db)
        async with running(app) as from_ip:
            client = from_ip("198.51.100.1")

            async def attempt(password: str) -> int:
                answer = await client.post("/api/auth/login", json={"username": "alice", "password": password})
                return answer.status_code

            assert [await attempt("wrong password") for _ in range(ATTEMPTS - 1)] == [401] * (ATTEMPTS - 1)
            assert await attempt(PASSWORD) == 200  # clears the count of alice at this address
            assert [await attempt("wrong password") for _ in range(ATTEMPTS - 1)] == [401] * (ATTEMPTS - 1)
            assert await attempt(PASSWORD) == 200  # would be 429 had the count not been reset
            assert [await attempt("wrong password") for _ in range(ATTEMPTS)] == [401] * ATTEMPTS
            assert await attempt(PASSWORD) == 429
            # Once the failures leave the window, logins work again (the limiter's clock is the test's: a slow
            # password check on a loaded machine must not end the window early).
            now = [1000.0]
            app.state.lmstack.limits = LocalLimits(logins=LoginLimiter(attempts=1, window_s=60, clock=lambda: now[0]))
            assert await attempt("wrong password") == 401
            assert await attempt(PASSWORD) == 429
            now[0] += 61
            assert await attempt(PASSWORD) == 200

    asyncio.run(scenario())


def test_login_limiter_windows() -> None:
    now = [1000.0]
    limiter = LoginLimiter(attempts=2, window_s=60, clock=lambda: now[0])

    def throttled(user: str, address: str) -> float | None:
        try:
            limiter.admit(user, address)
        except Throttled as exc:
            return exc.retry_after
        return None

    assert throttled("a", "x") is None
    now[0] += 10
    assert throttled("a", "x") is None
    assert throttled("a", "x") == pytest.approx(50)  # the pair's two failures, counted before any check
    assert throttled("b", "x") is None and throttled("a", "y") is None
    attempt = limiter.admit("a", "z")
    attempt.succeeded()  # does not count; and z becomes a known address of a
    now[0] += 50
    assert throttled("a", "x") is None
    now[0] += 120
    limiter.admit("c", "w")  # sweeps subjects idle for a window
    assert set(limiter._log._events) == {("pair", "c", "w"), ("ip", "w"), ("user", "c")}


def test_a_user_under_attack_gets_one_try_per_new_address_and_any_from_a_known_one() -> None:
    now = [1000.0]
    limiter = LoginLimiter(attempts=2, window_s=60, clock=lambda: now[0])
    limiter.admit("admin", "10.9.9.9").succeeded()  # the admin's own address
    for i in range(2 * USER_FACTOR // 2):  # attackers: two failures from each of ten addresses
        limiter.admit("admin", f"10.0.0.{i}")
        limiter.admit("admin", f"10.0.0.{i}")
    with pytest.raises(Throttled):
        limiter.admit("admin", "10.0.0.1")  # the pair's own limit
    first = limiter.admit("admin", "10.1.1.1")  # a new address: its first try in the window is checked
    with pytest.raises(Throttled):
        limiter.admit("admin", "10.1.1.1")  # ... but no second while the user is under attack
    first.cancel()
    for _ in range(2):  # the admin's known address is never slowed by others' guessing
        limiter.admit("admin", "10.9.9.9").succeeded()
    now[0] += 61
    limiter.admit("admin", "10.1.1.1")
    limiter.admit("admin", "10.1.1.1")  # the attack left the window


@pytest.mark.parametrize("kind", ["alg-none", "wrong-key", "expired", "hs512", "no-exp", "unknown-user", "garbage"])
def test_bad_tokens_are_refused(db: Database, client: TestClient, kind: str) -> None:
    add_user(db, "alice", role="admin")
    now = datetime.now(UTC)
    claims = {"sub": "alice", "role": "admin", "iat": now, "exp": now + timedelta(hours=1)}
    tokens = {
        "alg-none": lambda: jwt.encode(claims, None, algorithm="none"),
        "wrong-key": lambda: jwt.encode(claims, "another-secret-0123456789abcdef0123", algorithm="HS256"),
        "expired": lambda: jwt.encode({**claims, "exp": now - timedelta(seconds=5)}, SECRET, algorithm="HS256"),
        "hs512": lambda: jwt.encode(claims, SECRET, algorithm="HS512"),
        "no-exp": lambda: jwt.encode({"sub": "alice", "role": "admin"}, SECRET, algorithm="HS256"),
        "unknown-user": lambda: jwt.encode({**claims, "sub": "ghost"}, SECRET, algorithm="HS256"),
        "garbage": lambda: "not.a.token",
    }
    good = jwt.encode(claims, SECRET, algorithm="HS256")
    assert client.get("/api/auth/me", headers=auth(good)).status_code == 200
    response = client.get("/api/auth/me", headers=auth(tokens[kind]()))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_token"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_the_token_role_is_not_trusted_over_the_database(db: Database, client: TestClient) -> None:
    add_user(db, "bob")  # a viewer, with a forged-looking but validly signed token claiming admin
    now = datetime.now(UTC)
    token = jwt.encode({"sub": "bob", "role": "admin", "exp": now + timedelta(hours=1)}, SECRET, algorithm="HS256")
    assert client.get("/api/auth/me", headers=auth(token)).json()["role"] == "viewer"


def test_missing_credentials(client: TestClient) -> None:
    response = client.get("/api/auth/me")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


# -- API keys over HTTP ----------------------------------------------------------------------------


def test_keys_over_http(db: Database, client: TestClient) -> None:
    add_user(db, "alice", role="admin")
    add_user(db, "bob")
    admin, viewer = login(client, "alice"), login(client, "bob")

    created = client.post("/api/keys", headers=auth(admin),
                          json={"name": "ci", "user": "bob", "models": ["qwen-7b", "llama"], "rpm_limit": 60})
    assert created.status_code == 201, created.text
    body = created.json()
    token = body["key"]
    assert token.startswith("lmsk_") and len(token) == 48
    assert body["user"] == "bob" and body["models"] == ["qwen-7b", "llama"] and body["rpm_limit"] == 60
    assert body["prefix"] == token[:17] and body["status"] == "active" and body["expires_at"] is None

    # Stored as a lookup prefix and a SHA-256 digest only: the key is in no column.
    with db.session() as session:
        row = session.scalars(select(ApiKey)).one()
    assert row.prefix == token[5:17]
    assert row.key_hash == hashlib.sha256(token.encode()).hexdigest()
    assert not any(token in str(getattr(row, column.key)) for column in ApiKey.__table__.columns)

    own = client.post("/api/keys", headers=auth(viewer), json={"name": "laptop"})
    assert own.status_code == 201 and own.json()["user"] == "bob"
    for_other = client.post("/api/keys", headers=auth(viewer), json={"name": "x", "user": "alice"})
    assert for_other.status_code == 403
    assert for_other.json()["error"]["type"] == "permission_error"
    admins = client.post("/api/keys", headers=auth(admin), json={"name": "admin-key"})
    assert admins.status_code == 201 and admins.json()["user"] == "alice"

    listed = client.get("/api/keys", headers=auth(admin))
    assert listed.status_code == 200
    assert [k["name"] for k in listed.json()["data"]] == ["ci", "laptop", "admin-key"]
    assert all("key" not in k for k in listed.json()["data"])
    assert token not in listed.text and own.json()["key"] not in listed.text
    assert [k["name"] for k in client.get("/api/keys", headers=auth(viewer)).json()["data"]] == ["ci", "laptop"]

    # Revoking: one's own, or any as an admin; another's key is not found for a viewer.
    assert client.delete(f"/api/keys/{admins.json()['id']}", headers=auth(viewer)).status_code == 404
    revoked = client.delete(f"/api/keys/{own.json()['id']}", headers=auth(viewer))
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    again = client.delete(f"/api/keys/{own.json()['id']}", headers=auth(viewer))
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert client.delete(f"/api/keys/{body['id']}", headers=auth(admin)).json()["status"] == "revoked"
    assert client.delete("/api/keys/999", headers=auth(admin)).status_code == 404


def test_key_requests_are_validated(db: Database, client: TestClient) -> None:
    add_user(db, "alice", role="admin")
    add_user(db, "off", disabled=True)
    admin = login(client, "alice")
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    cases: list[tuple[dict[str, Any], int]] = [
        ({"name": "x", "user": "ghost"}, 404),
        ({"name": "x", "user": "off"}, 400),
        ({"name": "x", "expires_at": past}, 400),
        ({"name": "x", "expires_at": "2030-01-01T00:00:00"}, 400),  # no time zone
        ({"name": "x", "models": []}, 400),
        ({"name": "x", "models": ["a", " "]}, 400),
        ({"name": "x", "rpm_limit": 0}, 400),
        ({"name": ""}, 400),
        ({"name": "x", "key": "lmsk_mine"}, 400),  # no choosing one's own key
    ]
    for request, status in cases:
        response = client.post("/api/keys", headers=auth(admin), json=request)
        assert response.status_code == status, (request, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_an_api_key_cannot_manage_keys(db: Database, client: TestClient) -> None:
    add_user(db, "alice", role="admin")
    key = add_key(db, "alice", models=["qwen-7b"])
    me = client.get("/api/auth/me", headers=auth(key))
    assert me.status_code == 200 and me.json()["via"] == "api_key"
    for method, path in (("POST", "/api/keys"), ("GET", "/api/keys"), ("DELETE", "/api/keys/1")):
        response = client.request(method, path, headers=auth(key), json={"name": "more"})
        assert response.status_code == 403, (method, path)


def test_revocation_takes_effect_within_a_second(db: Database, client: TestClient) -> None:
    add_user(db, "alice", role="admin")
    admin = login(client, "alice")
    created = client.post("/api/keys", headers=auth(admin), json={"name": "hot"}).json()
    for _ in range(20):  # hot in the cache
        assert client.get("/api/auth/me", headers=auth(created["key"])).status_code == 200
    started = time.monotonic()
    assert client.delete(f"/api/keys/{created['id']}", headers=auth(admin)).status_code == 200
    wait_for_status(client, created["key"], 401)
    assert time.monotonic() - started < 1.5


def test_expired_and_disabled_users_keys_are_refused(db: Database, client: TestClient) -> None:
    add_user(db, "alice")
    add_user(db, "bob")
    expired = add_key(db, "alice", expires_at=datetime.now(UTC) + timedelta(days=1))
    with db.session() as session:
        session.execute(update(ApiKey).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert client.get("/api/auth/me", headers=auth(expired)).status_code == 401
    bobs = add_key(db, "bob")
    wait_for_status(client, bobs, 200)
    with db.session() as session:
        set_disabled(session, name="bob", disabled=True)
    assert wait_for_status(client, bobs, 401) < 1.5
    assert client.get("/api/auth/me", headers=auth("lmsk_" + "A" * 43)).status_code == 401


# -- verification and its cache --------------------------------------------------------------------


def last_used(db: Database) -> datetime | None:
    """The (only) key's last_used_at."""
    with db.session() as session:
        return session.scalar(select(ApiKey.last_used_at))


def test_a_cached_key_costs_no_database_round_trip(db: Database) -> None:
    add_user(db, "alice")
    token = add_key(db, "alice")
    cache = KeyCache(db, ttl_s=5)

    async def scenario() -> None:
        with count_statements(db) as statements:
            first = await cache.verify(token)
        assert first is not None and first.user == "alice"
        assert any(map(_is("SELECT"), statements))
        with count_statements(db) as statements:
            for _ in range(1000):
                assert await cache.verify(token) == first
            assert await cache.verify("lmsk_unknown-key-000000000000000000000000000000") is None
            assert await cache.verify("lmsk_unknown-key-000000000000000000000000000000") is None
        assert len(statements) == 1  # the unknown key, once: refusals are cached too

    asyncio.run(scenario())


def test_concurrent_lookups_of_a_key_share_one_query(db: Database) -> None:
    add_user(db, "alice")
    token = add_key(db, "alice")
    cache = KeyCache(db, ttl_s=5)

    async def scenario() -> None:
        with count_statements(db) as statements:
            results = await asyncio.gather(*(cache.verify(token) for _ in range(50)))
        assert len({r.id for r in results if r is not None}) == 1 and None not in results
        assert len([s for s in statements if _is("SELECT")(s)]) == 1

    asyncio.run(scenario())


def test_verification_compares_digests_in_constant_time(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    add_user(db, "alice")
    token = add_key(db, "alice")
    compared: list[tuple[str, str]] = []
    real = security.hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert security.digests_match(digest, token) and compared == [(digest, digest)]

    uses: list[str] = []

    def counted(stored: str, presented: str) -> bool:
        uses.append(stored)
        return security.digests_match(stored, presented)

    monkeypatch.setattr(keys_service, "digests_match", counted)
    wrong = token[:17] + ("A" if token[17] != "A" else "B") + token[18:]  # same prefix, wrong secret
    assert asyncio.run(KeyCache(db, ttl_s=1).verify(wrong)) is None
    assert asyncio.run(KeyCache(db, ttl_s=1).verify(token)) is not None
    assert uses == [digest, digest]


def test_a_key_expiring_while_cached_is_refused(db: Database) -> None:
    add_user(db, "alice")
    token = add_key(db, "alice", expires_at=datetime.now(UTC) + timedelta(seconds=0.3))
    cache = KeyCache(db, ttl_s=5)

    async def scenario() -> None:
        assert await cache.verify(token) is not None
        await asyncio.sleep(0.35)
        with count_statements(db) as statements:
            assert await cache.verify(token) is None
        assert statements == []

    asyncio.run(scenario())


def test_while_the_database_is_down_keys_checked_before_keep_working_for_the_grace_time(db: Database) -> None:
    """A key and a login checked while the database answered stay valid through an outage (up to the grace
    time after their last read), a key never seen gets CredentialsUnavailable (503), the database is tried at
    most once a second meanwhile, and a key revoked during the outage is refused once it answers again."""
    add_user(db, "alice")
    token = add_key(db, "alice")
    unseen = add_key(db, "alice")
    now = [1000.0]
    cache = KeyCache(db, ttl_s=1, clock=lambda: now[0], outage_grace_s=60)
    down = Database(create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/postgres",
                                  connect_args={"connect_timeout": 2}))

    async def scenario() -> None:
        info = await cache.verify(token)
        assert info is not None and await cache.user_role("alice") == "viewer"
        cache.database = down
        now[0] += 5  # the cached answers expired: each needs the database, which is down
        assert await cache.verify(token) == info and await cache.user_role("alice") == "viewer"
        lookups = cache.lookups
        for _ in range(100):  # within the second after a failed try: the database is not tried again
            assert await cache.verify(token) == info
        with pytest.raises(keys_service.CredentialsUnavailable):
            await cache.verify(unseen)
        assert cache.lookups == lookups and cache.outage_since == 1005.0
        now[0] += 50  # 55 s after the last read: still within the grace time (60 s)
        assert await cache.verify(token) == info
        now[0] += 10  # past it: no longer trusted
        with pytest.raises(keys_service.CredentialsUnavailable):
            await cache.verify(token)

        with db.session() as session:  # revoked meanwhile (from another server, or by hand)
            session.execute(update(ApiKey).where(ApiKey.id == info.id).values(revoked_at=datetime.now(UTC)))
        cache.database = db
        now[0] += 1.5
        assert await cache.verify(token) is None and cache.outage_since is None
        assert await cache.verify(unseen) is not None

    asyncio.run(scenario())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_revoked_keys_are_refused_after_the_cache_time(db: Database) -> None:
    add_user(db, "alice")
    token = add_key(db, "alice")
    cache = KeyCache(db, ttl_s=0.2)

    async def scenario() -> None:
        info = await cache.verify(token)
        assert info is not None
        with db.session() as session:
            revoke_key(session, key_id=info.id)
        await asyncio.sleep(0.25)
        assert await cache.verify(token) is None

    asyncio.run(scenario())


def test_last_used_is_written_at_most_once_a_minute(db: Database) -> None:
    add_user(db, "alice")
    token = add_key(db, "alice")
    cache = KeyCache(db, ttl_s=0.01)

    async def scenario() -> None:
        with count_statements(db) as statements:
            for _ in range(5):  # each one a database lookup: the cache time has passed
                assert await cache.verify(token) is not None
                await asyncio.sleep(0.02)
        assert len([s for s in statements if _is("SELECT")(s)]) == 5
        assert len([s for s in statements if _is("UPDATE")(s)]) == 1
        first = last_used(db)
        assert first is not None and datetime.now(UTC) - first < timedelta(seconds=5)
        with db.session() as session:
            session.execute(update(ApiKey).values(last_used_at=datetime.now(UTC) - timedelta(minutes=2)))
        assert await cache.verify(token) is not None
        later = last_used(db)
        assert later is not None and datetime.now(UTC) - later < timedelta(seconds=5)

    asyncio.run(scenario())


def test_keys_in_use_stay_warm_and_revocation_still_lands_within_the_cache_time(db: Database) -> None:
    add_user(db, "alice")
    token = add_key(db, "alice")
    cache = KeyCache(db, ttl_s=0.2)

    async def scenario() -> None:
        refresher = asyncio.create_task(cache.run())
        try:
            info = await cache.verify(token)
            assert info is not None and cache.lookups == 1
            await asyncio.sleep(1.0)  # five cache times without a request
            with count_statements(db) as statements:
                assert await cache.verify(token) == info
            assert statements == [] and cache.lookups == 1  # still warm: no database on the request path
            assert cache.rechecks >= 4  # ... because it was re-read in the background (about every 0.1 s)
            with db.session() as session:
                revoke_key(session, key_id=info.id)
            revoked_at = time.monotonic()
            while await cache.verify(token) is not None:
                await asyncio.sleep(0.01)
            assert time.monotonic() - revoked_at < 0.2
            assert cache.lookups == 1  # the re-check saw the revocation, not a request's own lookup
        finally:
            refresher.cancel()

    asyncio.run(scenario())


def test_the_recheck_sees_a_disabled_user_and_writes_last_used(db: Database) -> None:
    add_user(db, "alice")
    token = add_key(db, "alice")
    cache = KeyCache(db, ttl_s=0.2)

    async def scenario() -> None:
        assert await cache.verify(token) is not None
        assert await cache.user_role("alice") == "viewer"
        with db.session() as session:
            session.execute(update(ApiKey).values(last_used_at=datetime.now(UTC) - timedelta(minutes=2)))
        assert await cache.verify(token) is not None  # cached, and used since the last re-check
        with count_statements(db) as statements:
            await cache.refresh()
        assert len([s for s in statements if _is("SELECT")(s)]) == 2  # every key, then every user
        assert len([s for s in statements if _is("UPDATE")(s)]) == 1
        written = last_used(db)
        assert written is not None and datetime.now(UTC) - written < timedelta(seconds=5)
        with count_statements(db) as statements:
            await cache.refresh()  # not used since: last_used_at is not written again
        assert not any(map(_is("UPDATE"), statements))
        with db.session() as session:
            set_disabled(session, name="alice", disabled=True)
        await cache.refresh()
        with count_statements(db) as statements:
            assert await cache.verify(token) is None
            assert await cache.user_role("alice") is None
        assert statements == []

    asyncio.run(scenario())


def test_key_rate_limit_is_a_sliding_minute() -> None:
    now = [0.0]
    limiter = KeyRateLimiter(clock=lambda: now[0])
    for at in (0, 10, 20):
        now[0] = at
        assert limiter.check(1, 3) is None
    now[0] = 30
    assert limiter.check(1, 3) == pytest.approx(30)  # until the request at 0 is a minute old
    assert limiter.check(2, 3) is None  # per key
    assert limiter.check(1, None) is None  # no limit
    now[0] = 60
    assert limiter.check(1, 3) is None
    now[0] = 61
    assert limiter.check(1, 3) == pytest.approx(9)  # the one at 10 leaves at 70


def test_limits_use_the_keys_rpm_limit() -> None:
    limits = LocalLimits(logins=LoginLimiter(attempts=1))
    info = KeyInfo(id=7, name="k", user="alice", role="viewer", models=None, rpm_limit=2, expires_at=None)

    async def rates(key: KeyInfo, n: int) -> list[float | None]:
        return [await limits.rate(key) for _ in range(n)]

    *allowed, wait = asyncio.run(rates(info, 3))
    assert allowed == [None, None] and wait is not None and 59 < wait <= 60
    unlimited = KeyInfo(id=8, name="k", user="alice", role="viewer", models=("a",), rpm_limit=None, expires_at=None)
    assert asyncio.run(rates(unlimited, 100)) == [None] * 100
    assert unlimited.allows("a") and not unlimited.allows("b")


# -- the command line ------------------------------------------------------------------------------


def lmstack(database_url: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMSTACK_DATABASE_URL": database_url, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lmstack", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=60)


def cli(database_url: str, *args: str, stdin: str = "") -> Result:
    env = {"LMSTACK_DATABASE_URL": database_url, "NO_COLOR": "1", "COLUMNS": "200"}
    return CliRunner().invoke(cli_app, list(args), input=stdin, env=env)


def test_users_cli(db: Database, database_url: str, client: TestClient) -> None:
    created = lmstack(database_url, "users", "create", "alice", "--admin", "--password-stdin", stdin=PASSWORD + "\n")
    assert created.returncode == 0, created.stderr
    assert login(client, "alice")
    assert lmstack(database_url, "users", "create", "bob", "--password-stdin", stdin=PASSWORD).returncode == 0
    assert lmstack(database_url, "users", "disable", "bob").returncode == 0
    assert client.post("/api/auth/login", json={"username": "bob", "password": PASSWORD}).status_code == 403
    listed = lmstack(database_url, "users", "list")
    assert listed.returncode == 0
    assert "alice" in listed.stdout and "admin" in listed.stdout and "disabled" in listed.stdout
    assert PASSWORD not in listed.stdout
    with db.session() as session:
        assert {u.name: (u.role, u.disabled) for u in list_users(session)} == {
            "alice": ("admin", False), "bob": ("viewer", True)}

    # The refusals, in process (quicker; CliRunner's stdin is not a terminal either).
    short = cli(database_url, "users", "create", "carol", "--password-stdin", stdin="too-short\n")
    assert short.exit_code == 1 and "at least 12 characters" in short.stderr
    no_tty = cli(database_url, "users", "create", "carol")
    assert no_tty.exit_code == 1 and "--password-stdin" in no_tty.stderr
    twice = cli(database_url, "users", "create", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert twice.exit_code == 1 and "already exists" in twice.stderr
    assert cli(database_url, "users", "disable", "ghost").exit_code == 1
    assert cli(database_url, "users", "enable", "bob").exit_code == 0
    assert login(client, "bob")


def test_keys_cli(db: Database, database_url: str, client: TestClient) -> None:
    add_user(db, "alice")
    created = lmstack(database_url, "keys", "create", "--name", "ci", "--user", "alice", "--models", "a,b",
                      "--expires", "30d", "--rpm", "10")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("lmsk_") and len(token) == 48 and created.stdout == token + "\n"
    assert "not shown again" in created.stderr and token not in created.stderr

    me = client.get("/api/auth/me", headers=auth(token))
    assert me.status_code == 200 and me.json()["user"] == "alice"
    with db.session() as session:
        row = session.scalars(select(ApiKey)).one()
    assert row.models == ["a", "b"] and row.rpm_limit == 10 and row.expires_at is not None
    assert timedelta(days=29, hours=23) < row.expires_at - datetime.now(UTC) <= timedelta(days=30)
    assert row.key_hash == hashlib.sha256(token.encode()).hexdigest()

    listed = lmstack(database_url, "keys", "list")
    assert listed.returncode == 0 and token not in listed.stdout
    assert token[:17] in listed.stdout and "ci" in listed.stdout and "a,b" in listed.stdout
    as_json = cli(database_url, "keys", "list", "--json")
    assert token not in as_json.stdout and '"last_used_at": "' in as_json.stdout  # used above
    assert cli(database_url, "keys", "revoke", "999").exit_code == 1
    revoked = lmstack(database_url, "keys", "revoke", token[:17])
    assert revoked.returncode == 0, revoked.stderr
    assert wait_for_status(client, token, 401) < 1.5  # counted from the revocation's commit (the CLI's exit)
    assert "revoked" in cli(database_url, "keys", "list").stdout

    bad = cli(database_url, "keys", "create", "--name", "x", "--user", "alice", "--expires", "soon")
    assert bad.exit_code == 2 and "duration" in bad.stderr
    nobody = cli(database_url, "keys", "create", "--name", "x", "--user", "ghost")
    assert nobody.exit_code == 1 and "no user 'ghost'" in nobody.stderr


def test_key_scopes_are_set_on_creation_and_listed(db: Database, database_url: str, client: TestClient) -> None:
    add_user(db, "alice", role="admin")
    scoped = cli(database_url, "keys", "create", "--name", "prom", "--user", "alice", "--scope", "metrics",
                 "--scope", "status")
    assert scoped.exit_code == 0 and "scopes: metrics, status" in scoped.stderr
    assert client.get("/metrics", headers=auth(scoped.stdout.strip())).status_code == 200
    unknown = cli(database_url, "keys", "create", "--name", "x", "--user", "alice", "--scope", "admin")
    assert unknown.exit_code == 1 and "unknown scope 'admin'" in unknown.stderr
    assert '"scopes": [\n      "metrics",\n      "status"\n    ]' in cli(database_url, "keys", "list", "--json").stdout

    token = login(client, "alice")
    made = client.post("/api/keys", headers=auth(token), json={"name": "dash", "scopes": ["status"]})
    assert made.status_code == 201 and made.json()["scopes"] == ["status"]
    key = made.json()["key"]
    assert client.get("/api/workers", headers=auth(key)).status_code == 200
    assert client.get("/metrics", headers=auth(key)).status_code == 403
    listed = client.get("/api/keys", headers=auth(token)).json()["data"]
    assert {k["name"]: k["scopes"] for k in listed} == {"prom": ["metrics", "status"], "dash": ["status"]}
    refused = client.post("/api/keys", headers=auth(token), json={"name": "x", "scopes": ["root"]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "scopes.0"


def test_users_create_asks_twice_on_a_terminal(db: Database, database_url: str, client: TestClient) -> None:
    import pty
    import select

    def create(*typed: str) -> tuple[int, str]:
        controller, terminal = pty.openpty()
        env = {**os.environ, "LMSTACK_DATABASE_URL": database_url, "NO_COLOR": "1"}
        # A new session: no controlling terminal, so getpass reads the pty on stdin (not the runner's tty).
        process = subprocess.Popen([sys.executable, "-m", "lmstack", "users", "create", "carol"], stdin=terminal,
                                   stdout=terminal, stderr=terminal, env=env, start_new_session=True)
        os.close(terminal)
        output = b""
        answers = iter(typed)
        deadline = time.monotonic() + 60
        while True:
            if not select.select([controller], [], [], max(0.0, deadline - time.monotonic()))[0]:
                process.kill()
                raise AssertionError(f"no prompt within 60 s: {output!r}")
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
            # Click writes "...:" and then getpass writes " " once echo is off (and pending input flushed).
            if output.endswith(b": "):
                answer = next(answers, None)
                if answer is not None:
                    os.write(controller, answer.encode() + b"\n")
                    output += b"\n"
        os.close(controller)
        return process.wait(timeout=60), output.decode(errors="replace")

    code, output = create(PASSWORD, "not the same password", PASSWORD, PASSWORD)
    assert code == 0, output
    assert "Repeat the password" in output and "do not match" in output and "Created viewer carol" in output
    assert PASSWORD not in output  # not echoed
    assert login(client, "carol")
