"""Usage recording: the rows equal what the engines reported, the database may go away without a request
failing or a record being lost (up to the buffer's bound), and the bound drops the oldest records."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
import test_gateway
from sqlalchemy import create_engine, func, select
from test_gateway import MESSAGES, add_deployment, add_key, add_user, chat, free_port, serve_model, wait_for

from lmstack.api.security import issue_token
from lmstack.api.services.limits import LocalLimits
from lmstack.api.services.metrics import Metrics
from lmstack.api.services.ratelimit import LoginLimiter
from lmstack.api.services.usage import UsageRecorder
from lmstack.config import Settings
from lmstack.state import ApiKey, Database, Usage, User, open_database

# The gateway tests' fixtures, used here too: stand-in engines and the gateway in a thread.
standins = test_gateway.standins
start_gateway = test_gateway.start_gateway


def usage_totals(db: Database, **where: Any) -> dict[str, int]:
    """Sums over the usage rows (a run that crosses an hour has two rows per key and model)."""
    columns = ("requests", "errors", "prompt_tokens", "completion_tokens")
    query = select(*(func.coalesce(func.sum(getattr(Usage, c)), 0) for c in columns))
    for name, value in where.items():
        query = query.where(getattr(Usage, name) == value)
    with db.session() as session:
        row = session.execute(query).one()
    return dict(zip(columns, (int(v) for v in row), strict=True))


def direct_usage(endpoint: str, path: str, body: dict[str, Any]) -> tuple[int, int]:
    """What the engine reports for `body`, asked directly (the stand-in is deterministic)."""
    if body.get("stream"):
        body = {**body, "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=10) as http:
        answer = http.post(endpoint + path, json=body)
        answer.raise_for_status()
        if not body.get("stream"):
            usage = answer.json()["usage"]
        else:
            chunks = [json.loads(line[6:]) for line in answer.text.splitlines()
                      if line.startswith("data: {")]
            usage = chunks[-1]["usage"]
    return usage["prompt_tokens"], usage.get("completion_tokens", 0)


def test_usage_rows_equal_what_the_engine_reported(db, standins, start_gateway):
    engine = standins("m", token_delay=0.0)
    serve_model(db, [engine])
    add_deployment(db, "down")
    key, key_id = add_key(db, user="alice")
    other_key, other_id = add_key(db, user="bob", name="bob's")
    gateway = start_gateway()
    client = gateway.sdk(key)

    expected = [0, 0]
    requests = [
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES}),
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "stream": True}),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "a b c d e f g"}],
                                  "stream": True, "max_tokens": 4}),
        ("/v1/completions", {"model": "m", "prompt": "one two", "stream": True}),
        ("/v1/completions", {"model": "m", "prompt": "one two three four"}),
        ("/v1/embeddings", {"model": "m", "input": ["a b c", "d"]}),
    ]
    for path, body in requests:
        prompt, completion = direct_usage(engine.endpoint, path, body)
        expected[0] += prompt
        expected[1] += completion
    for path, body in requests:  # through the gateway, with the SDK
        if path == "/v1/embeddings":
            client.embeddings.create(model="m", input=body["input"])
        elif path == "/v1/completions":
            result = client.completions.create(**body)
            if body.get("stream"):
                list(result)
        else:
            result = client.chat.completions.create(**body)
            if body.get("stream"):
                list(result)
    # The client asked for the usage chunk: counted once, and the client gets it.
    asked = list(chat(client, stream=True, stream_options={"include_usage": True}))
    expected[0] += asked[-1].usage.prompt_tokens
    expected[1] += asked[-1].usage.completion_tokens
    with pytest.raises(openai.InternalServerError):
        chat(client, model="down")  # 503, counted as a request with an error
    chat(gateway.sdk(other_key))  # another user's key
    other = chat(gateway.sdk(other_key)).usage

    wait_for("usage to be written", lambda: usage_totals(db, api_key_id=key_id)["requests"] == 8, timeout=10)
    assert usage_totals(db, api_key_id=key_id, model="m") == {
        "requests": 7, "errors": 0, "prompt_tokens": expected[0], "completion_tokens": expected[1]}
    assert usage_totals(db, api_key_id=key_id, model="down") == {
        "requests": 1, "errors": 1, "prompt_tokens": 0, "completion_tokens": 0}
    wait_for("the other key's usage", lambda: usage_totals(db, api_key_id=other_id)["requests"] == 2)
    assert usage_totals(db, api_key_id=other_id)["prompt_tokens"] == 2 * other.prompt_tokens
    assert gateway.state.usage.dropped == 0
    with db.session() as session:
        latencies = session.execute(select(Usage.latency_ms_sum, Usage.ttft_ms_sum)
                                    .where(Usage.api_key_id == key_id, Usage.model == "m")).all()
    assert sum(row[0] for row in latencies) > 0

    # GET /api/usage: a user sees their own keys' rows, an admin everyone's, with filters.
    with httpx.Client(base_url=gateway.url) as http:
        mine = http.get("/api/usage", headers={"authorization": f"Bearer {key}"}).json()["data"]
        assert {row["key_id"] for row in mine} == {key_id} and {row["user"] for row in mine} == {"alice"}
        assert sum(row["total_tokens"] for row in mine if row["model"] == "m") == sum(expected)
        add_user(db, "root", role="admin")
        admin, _ = issue_token("gateway-test-secret-" + "x" * 32, user="root", role="admin", ttl_s=600)
        everyone = http.get("/api/usage", headers={"authorization": f"Bearer {admin}"}).json()["data"]
        assert {row["key_id"] for row in everyone} == {key_id, other_id}
        only = http.get("/api/usage", params={"key": other_id, "model": "m"},
                        headers={"authorization": f"Bearer {admin}"}).json()["data"]
        assert {(row["key_id"], row["model"]) for row in only} == {(other_id, "m")}
        later = http.get("/api/usage", params={"from": "2999-01-01T00:00:00Z"},
                         headers={"authorization": f"Bearer {admin}"}).json()["data"]
        assert later == []
        bad = http.get("/api/usage", params={"from": "yesterday"}, headers={"authorization": f"Bearer {admin}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "from"


# -- the recorder's database going away ---------------------------------------------------------------------


def test_usage_is_kept_while_its_database_is_down(db, standins, start_gateway, throwaway_postgres):
    usage_db = open_database(Settings(database_url=throwaway_postgres.url))  # migrated: has the usage table
    try:
        engine = standins("m")
        serve_model(db, [engine])
        key, key_id = add_key(db)
        with usage_db.session() as session:  # the same key in the throwaway database (usage refers to it)
            owner = User(name="alice", password_hash="x", role="viewer")
            session.add(owner)
            session.flush()
            session.add(ApiKey(id=key_id, name="k", user_id=owner.id, prefix="p", key_hash="h"))
        gateway = start_gateway()
        recorder = gateway.state.usage
        recorder.database = usage_db  # the recorder writes to the server we can stop
        client = gateway.sdk(key)
        per_request = chat(client).usage

        def run_requests(n: int) -> None:
            for i in range(n):
                if i % 2:
                    assert "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True))
                else:
                    assert chat(client).usage == per_request

        run_requests(4)
        wait_for("the first usage", lambda: usage_totals(usage_db, api_key_id=key_id)["requests"] == 5)

        throwaway_postgres.stop()
        run_requests(10)  # none fails
        wait_for("a failed flush", lambda: recorder.failed_flushes >= 2)
        assert recorder.pending == 10 and recorder.dropped == 0 and recorder.last_error is not None

        throwaway_postgres.start()
        wait_for("the buffered usage to be written", lambda: recorder.written == 15, timeout=20)
        assert recorder.pending == 0 and recorder.last_error is None
        assert usage_totals(usage_db, api_key_id=key_id) == {"requests": 15, "errors": 0,
                                          "prompt_tokens": 15 * per_request.prompt_tokens,
                                          "completion_tokens": 15 * per_request.completion_tokens}
    finally:
        usage_db.close()


# -- the recorder alone ----------------------------------------------------------------------------------------


def _unreachable() -> Database:
    """A database nothing listens for (a closed port): every connection is refused."""
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres",
                           connect_args={"connect_timeout": 2}, pool_pre_ping=True)
    return Database(engine)


def test_a_full_buffer_drops_the_oldest_records_and_counts_them(db):
    unreachable = _unreachable()
    recorder = UsageRecorder(unreachable, max_buffer=5, flush_s=0.05, metrics=Metrics(),
                             limits=LocalLimits(logins=LoginLimiter(attempts=5)))
    now = time.time()

    async def scenario() -> None:
        for i in range(3):
            recorder.record(key_id=None, model=f"m{i}", replica="d/0", status=200, latency_ms=10,
                            prompt_tokens=i, completion_tokens=1, at=now)
        assert not await recorder.flush()  # the database is unreachable: kept
        assert (recorder.pending, recorder.dropped, recorder.failed_flushes) == (3, 0, 1)
        for i in range(3, 8):
            recorder.record(key_id=None, model=f"m{i}", replica="d/0", status=200, latency_ms=10,
                            prompt_tokens=i, completion_tokens=1, at=now)
        assert (recorder.pending, recorder.dropped) == (5, 3)  # m0, m1, m2 pushed out
        assert not await recorder.flush()
        recorder.record(key_id=None, model="m8", replica="d/0", status=500, latency_ms=10, at=now)
        assert (recorder.pending, recorder.dropped) == (5, 4)  # m3 out
        recorder.database = db
        assert await recorder.flush()
        assert recorder.pending == 0 and recorder.written == 5

    try:
        asyncio.run(scenario())
    finally:
        unreachable.close()
    with db.session() as session:
        rows = {u.model: (u.requests, u.errors, u.prompt_tokens) for u in session.scalars(select(Usage))}
    assert rows == {"m4": (1, 0, 4), "m5": (1, 0, 5), "m6": (1, 0, 6), "m7": (1, 0, 7), "m8": (1, 1, 0)}


def test_flushes_add_to_the_hour_and_a_deleted_key_rolls_up_without_a_key(db):
    _, key_id = add_key(db)
    _, gone_id = add_key(db, name="gone")
    recorder = UsageRecorder(db, max_buffer=100, flush_s=1, metrics=Metrics(),
                             limits=LocalLimits(logins=LoginLimiter(attempts=5)))
    first_hour = 1_900_000_800.0  # 2030-03-17T18:00:00Z
    hour = first_hour + 20 * 60

    async def scenario() -> None:
        for at in (hour, hour + 60, hour + 3600):  # the third is the next hour
            recorder.record(key_id=key_id, model="m", replica="m/0", status=200, latency_ms=100, ttft_ms=20,
                            prompt_tokens=10, completion_tokens=5, at=at)
        recorder.record(key_id=None, model="m", replica="m/0", status=200, latency_ms=1, at=hour)
        assert await recorder.flush()
        recorder.record(key_id=key_id, model="m", replica="m/1", status=502, latency_ms=7, at=hour)
        with db.session() as session:
            session.delete(session.get(ApiKey, gone_id))
        recorder.record(key_id=gone_id, model="m", replica="m/0", status=200, latency_ms=1, prompt_tokens=3,
                        at=hour)
        assert await recorder.flush()

    asyncio.run(scenario())
    with db.session() as session:
        rows = {(u.api_key_id, u.hour.timestamp()): (u.requests, u.errors, u.prompt_tokens, u.completion_tokens,
                                                     u.latency_ms_sum, u.ttft_ms_sum)
                for u in session.scalars(select(Usage))}
    assert rows == {
        (key_id, first_hour): (3, 1, 20, 10, 207, 40),
        (key_id, first_hour + 3600): (1, 0, 10, 5, 100, 20),
        (None, first_hour): (2, 0, 3, 0, 2, 0),  # the keyless request and the deleted key's
    }
