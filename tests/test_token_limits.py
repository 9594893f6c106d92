"""Token limits per API key: tokens a minute (per process, on the limiter's clock) and tokens a UTC day (the
usage table plus what this process has not written yet), 429 in OpenAI's shape with Retry-After.

Through the gateway over real HTTP with stand-in engines and the official `openai` SDK (test_gateway's
fixtures), on the real PostgreSQL; the limiter's own accounting alone; keys over the API and the CLI; the
migration that adds the columns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text
from test_auth import PASSWORD, SECRET, auth, cli, login
from test_gateway import Gateway, add_key, add_user, chat, serve_model, standins, start_gateway, wait_for

from lmstack.api.app import create_app
from lmstack.api.services.keys import InvalidKeyRequest, create_key
from lmstack.api.services.limits import LocalLimits
from lmstack.api.services.ratelimit import DAY_S, TokenLimiter
from lmstack.api.services.users import create_user
from lmstack.config import Settings
from lmstack.state import ApiKey, Database, Usage, downgrade, open_database, upgrade

__all__ = ["standins", "start_gateway"]  # fixtures: imported for the tests below


def limited_key(db: Database, *, name: str, tpm: int | None = None, tpd: int | None = None) -> tuple[str, int]:
    with db.session() as session:
        created = create_key(session, user="alice", name=name, tpm_limit=tpm, tpd_limit=tpd)
        return created.token, created.record.id


def refused(client: openai.OpenAI, **kwargs: Any) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as error:
        chat(client, **kwargs)
    assert error.value.status_code == 429 and error.value.type == "rate_limit_error"
    return error.value


def retry_after(error: openai.APIStatusError) -> int:
    return int(error.response.headers["retry-after"])


def clear_of_midnight() -> None:
    """A day's count restarts at 00:00 UTC: a test that straddles it would see its tokens vanish."""
    left = DAY_S - time.time() % DAY_S
    if left < 30:
        time.sleep(left + 1)


# -- through the gateway ----------------------------------------------------------------------------------


def test_a_key_over_its_tokens_a_minute_is_refused_until_the_minute_passes(
        db: Database, standins: Callable[..., Any], start_gateway: Callable[..., Gateway]) -> None:
    engine = standins("m")
    serve_model(db, [engine])
    add_user(db, "alice")
    free, _ = add_key(db, name="no limits")
    gateway = start_gateway()
    now = [1000.0]
    limits = gateway.state.limits
    assert isinstance(limits, LocalLimits)
    limits.tokens = TokenLimiter(clock=lambda: now[0])  # the minute on the test's clock
    unlimited = gateway.sdk(free)
    per_request = chat(unlimited).usage.total_tokens
    key, _ = limited_key(db, name="limited", tpm=2 * per_request)
    client = gateway.sdk(key)

    assert chat(client).choices[0].message.content
    streamed = chat(client, stream=True)  # a stream's tokens count too (the gateway asks for its usage chunk)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed)
    served = engine.requests()
    error = refused(client)
    assert error.code == "tokens_per_minute_exceeded" and retry_after(error) == 60
    assert f"used {2 * per_request} of its {2 * per_request} tokens a minute" in error.message, error.message
    assert "frees in 60 s" in error.message
    now[0] += 30
    assert retry_after(refused(client)) == 30
    assert engine.requests() == served  # refused before any engine

    # A key without limits is not affected, and not even tracked.
    for _ in range(5):
        assert chat(unlimited).choices[0].message.content
    assert len(limits.tokens._minute) == 1 and not limits.tokens._unwritten

    now[0] += 30.5  # the two answers leave the minute
    assert chat(client).choices[0].message.content


def test_a_key_over_its_tokens_a_day_is_refused_across_a_restart(
        db: Database, standins: Callable[..., Any], start_gateway: Callable[..., Gateway]) -> None:
    clear_of_midnight()
    engine = standins("m")
    serve_model(db, [engine])
    add_user(db, "alice")
    free, _ = add_key(db, name="no limits")
    # Usage written every 0.1 s; keys in use re-read only every 2.5 s: the table's count stays the first read's.
    gateway = start_gateway(key_cache_s=5.0)
    per_request = chat(gateway.sdk(free)).usage.total_tokens
    key, _ = limited_key(db, name="daily", tpd=4 * per_request)
    client = gateway.sdk(key)

    # Four fit, the fifth does not, though the answers are written since the key was read: what the process
    # wrote after that read still counts here.
    for _ in range(4):
        assert chat(client).choices[0].message.content
        time.sleep(0.2)
    error = refused(client)
    assert error.code == "tokens_per_day_exceeded"
    assert f"used {4 * per_request} of its {4 * per_request} tokens a day (the UTC day)" in error.message
    assert "at 00:00 UTC" in error.message, error.message
    midnight = DAY_S - time.time() % DAY_S
    assert midnight - 5 <= retry_after(error) <= midnight + 5
    gateway.stop()  # writes what it has not

    again = start_gateway()  # a new process (keys in use re-read every 0.5 s): the day comes from the table
    served = engine.requests()
    assert refused(again.sdk(key)).code == "tokens_per_day_exceeded"
    assert engine.requests() == served

    # Across usage writes and key re-reads each answer counts exactly once: four fit, the fifth does not.
    second, _ = limited_key(db, name="daily too", tpd=4 * per_request)
    client = again.sdk(second)
    for _ in range(4):
        assert chat(client).choices[0].message.content
        time.sleep(0.35)
    assert refused(client).code == "tokens_per_day_exceeded"

    # Another server's usage today counts (seen within a key re-read); yesterday's does not.
    other, other_id = limited_key(db, name="shared", tpd=1000)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    with db.session() as session:
        session.add(Usage(api_key_id=other_id, model="m", hour=hour - timedelta(days=1), requests=1,
                          prompt_tokens=10**6))
        session.add(Usage(api_key_id=other_id, model="elsewhere", hour=hour, requests=1, prompt_tokens=900))
    client = again.sdk(other)
    assert chat(client).choices[0].message.content  # 900 of 1000
    with db.session() as session:
        session.add(Usage(api_key_id=other_id, model="elsewhere", revision="r2", hour=hour, requests=1,
                          completion_tokens=10**4))

    def over() -> bool:
        try:
            chat(client)
        except openai.RateLimitError:
            return True
        return False

    wait_for("the other server's tokens to count", over, timeout=3.0)


# -- the limiter alone ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    id: int = 1
    tpm_limit: int | None = None
    tpd_limit: int | None = None
    tokens_today: int | None = None
    tokens_read_at: datetime | None = None


@dataclass(frozen=True)
class _Answer:
    key_id: int | None
    prompt_tokens: int
    completion_tokens: int = 0
    at: float = 0.0


def test_the_minute_is_a_sliding_window_of_answers() -> None:
    now = [0.0]
    limiter = TokenLimiter(clock=lambda: now[0])
    key = _Key(tpm_limit=100)
    assert limiter.tokens_over(key) is None  # tracked from its first check
    limiter.used(_Answer(1, 60))
    now[0] = 10.0
    limiter.used(_Answer(1, 30, 10))
    over = limiter.tokens_over(key)
    assert over is not None and (over.per, over.used, over.limit) == ("minute", 100, 100)
    assert over.retry_after == 50.0  # when the first answer leaves, 40 remain
    now[0] = 60.0
    assert limiter.tokens_over(key) is None
    limiter.used(_Answer(1, 70))
    over = limiter.tokens_over(key)
    assert over is not None and over.retry_after == 10.0  # 40 + 70: the 40 must leave first
    limiter.used(_Answer(2, 10**6))  # another key, never checked: not tracked
    assert limiter.tokens_over(_Key(id=2, tpm_limit=1)) is None


def test_the_day_is_the_table_plus_what_it_has_not_seen() -> None:
    today = 20_000 * DAY_S + 3600.0
    wall = [today]
    limiter = TokenLimiter(wall=lambda: wall[0])
    read = datetime.fromtimestamp(today, UTC)

    def key(in_table: int, read_at: datetime | None) -> _Key:
        return _Key(tpd_limit=1000, tokens_today=in_table, tokens_read_at=read_at)

    def used(in_table: int, read_at: datetime | None) -> int | None:
        """The tokens counted for the key, when that is its limit or more (None: within it)."""
        over = limiter.tokens_over(key(in_table, read_at))
        return over.used if over is not None else None

    assert used(900, read) is None
    answers = [_Answer(1, 60, at=today), _Answer(1, 40, at=today), _Answer(None, 500, at=today)]
    for answer in answers:
        limiter.used(answer)
    over = limiter.tokens_over(key(900, read))  # not written yet: counted here
    assert over is not None and over.used == 1000 and over.retry_after == DAY_S - 3600
    later = read + timedelta(seconds=1)
    limiter.written(answers, at=later)
    assert used(900, read) == 1000  # written after the read: still counted here
    assert used(1000, later + timedelta(microseconds=1)) == 1000  # a read that saw them: counted there only
    # (The key cache never hands out an older read after a newer one: what a newer read saw is dropped here.)
    # Written at an unknown time: counted until the day ends, whatever the table says (twice at worst).
    limiter.used(_Answer(1, 50, at=today))
    limiter.written([_Answer(1, 50, at=today)], at=None)
    assert used(950, later + timedelta(hours=1)) == 1000
    # The next UTC day: yesterday's count is not read, nor this process's tokens of yesterday.
    wall[0] = today + DAY_S
    limiter.used(_Answer(1, 70, at=today))
    assert used(10**6, later) is None


# -- keys over the API and the CLI ------------------------------------------------------------------------


def test_token_limits_are_set_listed_and_checked(db: Database, database_url: str) -> None:
    with db.session() as session:
        create_user(session, name="alice", password=PASSWORD, role="admin")
    with TestClient(create_app(Settings(jwt_secret=SECRET), database=db)) as client:
        admin = login(client, "alice")
        created = client.post("/api/keys", headers=auth(admin),
                              json={"name": "app", "tpm_limit": 5000, "tpd_limit": 10**10})
        assert created.status_code == 201, created.text
        assert (created.json()["tpm_limit"], created.json()["tpd_limit"]) == (5000, 10**10)
        plain = client.post("/api/keys", headers=auth(admin), json={"name": "plain"}).json()
        assert (plain["tpm_limit"], plain["tpd_limit"]) == (None, None)
        listed = {k["name"]: k for k in client.get("/api/keys", headers=auth(admin)).json()["data"]}
        assert (listed["app"]["tpm_limit"], listed["app"]["tpd_limit"]) == (5000, 10**10)
        for field in ("tpm_limit", "tpd_limit"):
            for bad in (0, -1, 1.5, 2.0, "5", True, 2**63):
                answer = client.post("/api/keys", headers=auth(admin), json={"name": "bad", field: bad})
                assert answer.status_code == 400, (field, bad, answer.text)
                assert answer.json()["error"]["param"] == field and field in answer.json()["error"]["message"]
        assert client.post("/api/keys", headers=auth(admin), json={"name": "big", "tpm_limit": 2**31}
                           ).status_code == 400

    made = cli(database_url, "keys", "create", "--name", "cli", "--user", "alice", "--tpm", "100", "--tpd", "2000")
    assert made.exit_code == 0, made.output
    assert "tokens a minute: 100; tokens a day: 2000" in made.stderr
    for option, bad in (("--tpm", "0"), ("--tpd", "-3"), ("--tpm", "1.5"), ("--tpd", "lots")):
        refusal = cli(database_url, "keys", "create", "--name", "bad", "--user", "alice", option, bad)
        assert refusal.exit_code != 0 and option in refusal.output, (option, bad, refusal.output)
    with db.session() as session:
        rows = {k.name: (k.tpm_limit, k.tpd_limit) for k in session.scalars(select(ApiKey))}
    assert rows == {"app": (5000, 10**10), "plain": (None, None), "cli": (100, 2000)}  # nothing bad was made
    table = cli(database_url, "keys", "list").stdout
    assert "TPM" in table and "TPD" in table
    assert any("cli" in line and "100" in line and "2000" in line for line in table.splitlines())
    as_json = cli(database_url, "keys", "list", "--json").stdout
    assert '"tpm_limit": 100' in as_json and '"tpd_limit": 2000' in as_json

    # The service refuses them too (what the CLI and the API both call).
    with db.session() as session:
        cases: list[tuple[str, Any]] = [("tpm_limit", 0), ("tpd_limit", -5), ("tpm_limit", 2.5), ("tpd_limit", True)]
        for field, bad in cases:
            with pytest.raises(InvalidKeyRequest, match=field):
                create_key(session, user="alice", name="x", **{field: bad})


# -- the migration ----------------------------------------------------------------------------------------


def test_the_migration_adds_the_limits_and_takes_them_away(create_database: Callable[[], str]) -> None:
    database = open_database(Settings(database_url=create_database()), migrate=False)
    try:
        upgrade(database, "0003")
        with database.engine.begin() as conn:
            conn.execute(text("INSERT INTO users (name, password_hash, role) VALUES ('alice', 'h', 'viewer')"))
            conn.execute(text("INSERT INTO api_keys (name, user_id, prefix, key_hash, rpm_limit) "
                              "SELECT 'old', id, 'abcdabcdabcd', 'h', 60 FROM users"))
        upgrade(database, "0004")
        columns = {c["name"] for c in inspect(database.engine).get_columns("api_keys")}
        assert {"tpm_limit", "tpd_limit"} <= columns
        assert "ix_usage_api_key_id_hour" in {i["name"] for i in inspect(database.engine).get_indexes("usage")}
        with database.engine.begin() as conn:
            assert conn.execute(text("SELECT rpm_limit, tpm_limit, tpd_limit FROM api_keys")).one() == (60, None, None)
            conn.execute(text("UPDATE api_keys SET tpm_limit = 1000, tpd_limit = 10000000000"))
        downgrade(database, "0003")
        inspector = inspect(database.engine)
        assert not {"tpm_limit", "tpd_limit"} & {c["name"] for c in inspector.get_columns("api_keys")}
        assert "ix_usage_api_key_id_hour" not in {i["name"] for i in inspector.get_indexes("usage")}
        with database.engine.begin() as conn:
            assert conn.execute(text("SELECT name, rpm_limit FROM api_keys")).one() == ("old", 60)
        upgrade(database)
    finally:
        database.close()
