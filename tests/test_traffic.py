"""The gateway's last minutes per model (services/metrics.Traffic) and GET /api/traffic, which the dashboard's
charts read: 10-second buckets over 15 minutes, bounded memory, safe from many threads, and a key limited to
some models sees only those. Real PostgreSQL behind the app (for the credentials); the clock is the test's."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from apiserver import SECRET, add_user, bearer
from fastapi.testclient import TestClient

from lmstack.api.app import create_app
from lmstack.api.services.keys import create_key
from lmstack.api.services.metrics import Metrics, Traffic
from lmstack.api.services.status import View
from lmstack.config import Settings
from lmstack.state import Database

T0 = 1_800_000_000.0  # a bucket boundary (divisible by 10)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_requests_tokens_errors_and_ttft_land_in_10_second_buckets_over_15_minutes() -> None:
    clock = Clock(T0 + 3)
    traffic = Traffic(clock=clock)
    traffic.request("chat", failed=False, ttft_s=0.1)
    traffic.request("chat", failed=True)
    traffic.tokens("chat", 12, 30)
    clock.now = T0 + 14  # the next bucket
    traffic.request("chat", failed=False, ttft_s=0.2)
    traffic.request("chat", failed=False, ttft_s=0.4)
    traffic.tokens("chat", 0, 0)  # nothing to count: no bucket touched
    traffic.request("embed", failed=False)

    shot = traffic.snapshot()
    assert (shot.bucket_seconds, shot.window_seconds, len(shot.times)) == (10, 900, 90)
    assert shot.times[-1] == T0 + 10 and shot.times[0] == T0 + 10 - 890 and shot.now == T0 + 14
    chat, embed = shot.models
    assert (chat.model, embed.model) == ("chat", "embed")
    assert chat.requests[-2:] == [2, 2] and sum(chat.requests) == 4
    assert chat.errors[-2:] == [1, 0] and chat.prompt_tokens[-2] == 12 and chat.completion_tokens[-2] == 30
    assert chat.ttft_ms[-2:] == [100.0, 300.0] and chat.ttft_ms[0] is None  # the mean of those with a TTFT
    assert embed.requests[-1] == 1 and embed.ttft_ms[-1] is None
    # Camel case on the wire, like the rest of /api.
    wire = shot.model_dump(by_alias=True)
    assert {"bucketSeconds", "windowSeconds", "times", "now", "models"} == set(wire)
    assert {"model", "requests", "errors", "promptTokens", "completionTokens", "ttftMs"} == set(wire["models"][0])


def test_old_buckets_leave_the_window_and_an_idle_model_is_forgotten() -> None:
    clock = Clock(T0)
    traffic = Traffic(clock=clock)
    traffic.request("old", failed=False)
    traffic.request("busy", failed=False)
    clock.now = T0 + 600
    traffic.request("busy", failed=False)
    shot = traffic.snapshot()
    assert [m.model for m in shot.models] == ["busy", "old"]
    assert sum(shot.models[0].requests) == 2 and sum(shot.models[1].requests) == 1

    clock.now = T0 + 900  # the first bucket is out of the window; its ring slot is reused for this one
    traffic.request("busy", failed=False)
    shot = traffic.snapshot()
    assert [m.model for m in shot.models] == ["busy"]  # "old" had nothing in the window: gone
    assert sum(shot.models[0].requests) == 2 and shot.models[0].requests[-1] == 1

    clock.now = T0 + 3600  # an hour of quiet: nothing left
    assert traffic.snapshot().models == []


def test_memory_is_bounded_by_the_number_of_models_and_idle_ones_make_room() -> None:
    clock = Clock(T0)
    traffic = Traffic(clock=clock, max_models=3)
    for name in ("a", "b", "c", "d"):
        traffic.request(name, failed=False)
    assert [m.model for m in traffic.snapshot().models] == ["a", "b", "c"]  # "d" found no room
    clock.now = T0 + 1000  # a, b and c idle for a whole window
    traffic.request("d", failed=False)
    assert [m.model for m in traffic.snapshot().models] == ["d"]


def test_counting_from_many_threads_loses_nothing() -> None:
    traffic = Traffic(clock=Clock(T0 + 5))

    def hammer() -> None:
        for _ in range(5000):
            traffic.request("chat", failed=False, ttft_s=0.01)
            traffic.tokens("chat", 1, 2)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [chat] = traffic.snapshot().models
    assert (chat.requests[-1], chat.prompt_tokens[-1], chat.completion_tokens[-1]) == (40_000, 40_000, 80_000)


def test_a_view_limited_to_some_models_sees_only_those() -> None:
    traffic = Traffic(clock=Clock(T0))
    for name in ("chat", "embed", "secret"):
        traffic.request(name, failed=False)
    assert [m.model for m in traffic.snapshot(View(models=frozenset({"chat", "embed"}))).models] == ["chat", "embed"]


def test_the_gateways_metrics_feed_the_series() -> None:
    metrics = Metrics()
    metrics.observe_request("chat", 200, 0.5, 0.05)
    metrics.observe_request("chat", 502, 0.01)
    metrics.add_tokens("chat", 7, 9)
    [chat] = metrics.traffic.snapshot().models
    assert (sum(chat.requests), sum(chat.errors), sum(chat.prompt_tokens), sum(chat.completion_tokens)) == (2, 1, 7, 9)
    assert [t for t in chat.ttft_ms if t is not None] == [50.0]


@pytest.fixture
def client(tmp_path: Path, db: Database) -> Iterator[TestClient]:
    settings = Settings(jwt_secret=SECRET, home=tmp_path / "home", repo=None, ssh_key=None, known_hosts=None)
    with TestClient(create_app(settings, database=db)) as test_client:
        yield test_client


def test_api_traffic_needs_credentials_and_shows_a_limited_key_only_its_models(client: TestClient,
                                                                               db: Database) -> None:
    viewer = add_user(db, "watcher", "viewer")
    with db.session() as session:
        limited = create_key(session, user="watcher", name="chat only", models=["chat"], scopes=["status"]).token
        unscoped = create_key(session, user="watcher", name="calls only").token
    metrics: Metrics = client.app.state.lmstack.metrics  # type: ignore[attr-defined]
    metrics.observe_request("chat", 200, 0.2, 0.02)
    metrics.observe_request("embed", 200, 0.01)

    assert client.get("/api/traffic").status_code == 401
    assert client.get("/api/traffic", headers=bearer(unscoped)).status_code == 403
    everything = client.get("/api/traffic", headers=bearer(viewer))
    assert everything.status_code == 200, everything.text
    body = everything.json()
    assert [m["model"] for m in body["models"]] == ["chat", "embed"]
    assert sum(body["models"][0]["requests"]) == 1 and len(body["times"]) == 90 and body["bucketSeconds"] == 10
    assert [m["model"] for m in client.get("/api/traffic", headers=bearer(limited)).json()["models"]] == ["chat"]
    assert client.post("/api/traffic", headers=bearer(viewer)).status_code == 405  # read-only
