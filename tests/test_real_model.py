"""A real model end to end: a commit with a `llamacpp` deployment of SmolLM2 (2 replicas) applied onto two
test-bed hosts by `apply_source`, then the gateway (uvicorn over real HTTP, reading the same database) in
front of them, and the official `openai` SDK as the client.

What is checked: the model is listed; a chat answer and a streamed one (chunks spread over time); the usage
the gateway records equals what the engine reports (read independently from each engine's Prometheus
counters, `--metrics`), for a plain answer and for streams whether or not the client asks for the usage
chunk; a replica killed in the middle of a stream ends that stream with an error (not a hang) and the next
requests go to the other replica; malformed requests are answered 400 by the gateway and reach no engine.

The deployment is applied once for the module (about 10 s): the tests share the replicas, the gateway and a
database of their own, and each reads only what it changed (counters before and after, its own API key's
usage). The replica killed in the last test is started again at its end.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from apiserver import LiveServer
from sqlalchemy import select
from testbed.fleet import workers_yaml, write_fleet

from lmstack.api.app import create_app
from lmstack.api.services.keys import create_key
from lmstack.api.services.users import create_user
from lmstack.config import Settings
from lmstack.gitsource import load_source
from lmstack.reconcile.apply import apply_source
from lmstack.state import Database, Replica, open_database

MODEL = "smollm2"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
# Greedy, and always max_tokens long: the same request makes the same answer, on either replica.
FIXED = {"temperature": 0, "extra_body": {"ignore_eos": True}}
ENGINE_COUNTERS = ("prompt_tokens_total", "prompt_tokens_cached_total", "tokens_predicted_total",
                   "n_decode_total")


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the engines ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """One replica as the test sees it: where it runs and what its llama-server has counted."""

    name: str  # deployment/ordinal
    ordinal: int
    worker: str
    endpoint: str
    key: str  # the engine's API key (only the gateway, and this test, hold it)

    @property
    def container(self) -> str:
        return f"lmstack-{MODEL}-{self.ordinal}"

    def counters(self) -> dict[str, float]:
        """llama-server's counters (/metrics, enabled by --metrics): tokens and llama_decode calls so far."""
        call = urllib.request.Request(f"{self.endpoint}/metrics", headers={"Authorization": f"Bearer {self.key}"})
        with urllib.request.urlopen(call, timeout=10) as answer:
            text = answer.read().decode()
        found = {name: float(value) for name, value in re.findall(r"^llamacpp:(\w+) (\S+)$", text, re.M)}
        return {name: found[name] for name in (*ENGINE_COUNTERS, "requests_processing")}

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False


def engine_usage(before: dict[str, float], after: dict[str, float]) -> tuple[int, int]:
    """(prompt, completion) tokens an engine served between two readings of its counters. Its prompt tokens
    are those it evaluated plus those it reused from its cache, which together are what it reports."""
    prompt = (after["prompt_tokens_total"] - before["prompt_tokens_total"]
              + after["prompt_tokens_cached_total"] - before["prompt_tokens_cached_total"])
    return int(prompt), int(after["tokens_predicted_total"] - before["tokens_predicted_total"])


# -- the fleet: applied once, with the gateway in front ---------------------------------------------------


@dataclass
class Fleet:
    bed: Any
    database: Database
    server: LiveServer
    app: Any
    engines: list[Engine]
    hosts: dict[str, Any]  # worker name -> test-bed host
    user: str = "realmodel"

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def registry(self) -> Any:
        return self.app.state.lmstack.registry

    def new_key(self, name: str) -> tuple[str, int]:
        """A fresh API key (token, id): its usage is only what the test sends with it."""
        with self.database.session() as session:
            created = create_key(session, user=self.user, name=name)
            return created.token, created.record.id

    def sdk(self, key: str, timeout: float = 120.0) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=timeout)

    def counters(self) -> dict[str, dict[str, float]]:
        return {engine.name: engine.counters() for engine in self.engines}

    def recorded_usage(self, key: str, key_id: int, requests: int) -> dict[str, int]:
        """The key's usage as `GET /api/usage` gives it, once `requests` requests have been written."""
        totals: dict[str, int] = {}

        def written() -> bool:
            answer = httpx.get(f"{self.url}/api/usage", params={"key": key_id},
                               headers={"Authorization": f"Bearer {key}"}, timeout=10)
            assert answer.status_code == 200, answer.text
            rows = answer.json()["data"]  # one per hour: a test may straddle one
            totals.clear()
            for field in ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"):
                totals[field] = sum(int(row[field]) for row in rows)
            return totals["requests"] >= requests

        wait_for(f"{requests} requests of key {key_id} in /api/usage", written)
        assert totals["requests"] == requests, totals
        return totals


def _fleet_repo(root: Path, bed: Any, hosts: list[Any], image: str, model: str) -> Path:
    from testbed.llamacpp import model_cache

    deployment = (
        "apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {name: " + MODEL + "}\nspec:\n"
        f"  backend: llamacpp\n  model: {model}\n  image: {image}\n  replicas: 2\n"
        "  resources: {gpus: 0}\n  placement: {strategy: spread}\n  health: {startupTimeout: 180s}\n"
        # One thread each (two replicas share this machine's cores); --metrics: the counters read here.
        '  args: ["--threads", "1", "--metrics"]\n')
    return write_fleet(root / "fleet", bed, {f"{MODEL}.yaml": deployment},
                       workers=workers_yaml(hosts, model_cache=lambda host: model_cache(host.name)),
                       message=f"{MODEL} on two workers")


@pytest.fixture(scope="module")
def fleet(testbed: Any, llamacpp_image: str, smollm2_model: str, create_database: Callable[[], str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    bed = testbed
    assert len(bed.hosts) >= 2, "the test bed needs two hosts"
    hosts = bed.hosts[:2]
    root = tmp_path_factory.mktemp("real-model")
    database_url = create_database()  # this module's own: the tests using `db` truncate theirs
    database = open_database(Settings(database_url=database_url))
    try:
        repo = _fleet_repo(root, bed, hosts, llamacpp_image, smollm2_model)
        from testbed.llamacpp import MODEL_CACHE_ROOT  # the workers' model caches: a mount root allowed here
        source = load_source(repo=str(repo), ref="HEAD", directory=None,
                             settings=Settings(home=root / "home", mount_roots=[MODEL_CACHE_ROOT]))
        prepared, report = apply_source(source, database, ssh_key=bed.ssh_key, known_hosts=bed.known_hosts)
        assert report is not None and report.ok, [r.message for r in report.failed] if report else None
        placed = {a.replica_name: a.placement.worker for a in prepared.plan.actions if a.placement}
        assert sorted(placed) == [f"{MODEL}/0", f"{MODEL}/1"] and len(set(placed.values())) == 2, placed
        with database.session() as session:
            rows = list(session.scalars(select(Replica).order_by(Replica.ordinal)))
            assert [(r.deployment_name, r.ordinal, r.status) for r in rows] == [
                (MODEL, 0, "ready"), (MODEL, 1, "ready")], [(r.ordinal, r.status, r.message) for r in rows]
            engines = [Engine(f"{r.deployment_name}/{r.ordinal}", r.ordinal, r.worker_name, str(r.endpoint),
                              str(r.engine_key)) for r in rows]
            create_user(session, name="realmodel", password="not-used-here-0123456789", role="viewer")

        settings = Settings(database_url=database_url, jwt_secret="real-model-test-secret-" + "x" * 32,
                            registry_refresh_s=0.2, usage_flush_s=0.1, home=root / "home")
        app = create_app(settings, database=database)
        with LiveServer(app) as server:
            fleet = Fleet(bed=bed, database=database, server=server, app=app, engines=engines,
                          hosts={host.name: host for host in hosts})
            wait_for("both replicas in the gateway's registry", lambda: len(fleet.registry.targets(MODEL)) == 2)
            yield fleet
    finally:
        database.close()
        bed.reset()  # the containers go


def _content_chunks(stream: Any, started: float) -> tuple[str, list[float], list[Any]]:
    """Reads a streamed answer: its text, when each piece of content arrived, and every chunk."""
    text, times, chunks = [], [], []
    for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
                times.append(time.monotonic() - started)
    return "".join(text), times, chunks


# -- tests ------------------------------------------------------------------------------------------------


def test_apply_starts_both_replicas_and_the_gateway_lists_the_model(fleet: Fleet) -> None:
    assert sorted(engine.worker for engine in fleet.engines) == sorted(fleet.hosts)  # one on each host
    for engine in fleet.engines:
        host = fleet.hosts[engine.worker]
        running = fleet.bed.docker(host, "ps", "--format", "{{.Names}}").stdout.split()
        assert running == [engine.container]
        assert engine.healthy()
    key, _ = fleet.new_key("models")
    with fleet.sdk(key) as client:
        models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "lmstack"


def test_a_chat_answer_and_its_usage_as_the_engine_reported_it(fleet: Fleet) -> None:
    key, key_id = fleet.new_key("chat")
    before = fleet.counters()
    with fleet.sdk(key) as client:
        reply = client.chat.completions.create(
            model=MODEL, max_tokens=24, messages=[{"role": "user", "content": "What is the capital of France?"}],
            **FIXED)
    after = fleet.counters()
    content = reply.choices[0].message.content
    assert isinstance(content, str) and content.strip(), reply
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens == 24

    served = {name: engine_usage(before[name], after[name]) for name in before}
    assert sorted(served.values()) == [(0, 0), (reply.usage.prompt_tokens, 24)], served  # one engine answered
    recorded = fleet.recorded_usage(key, key_id, requests=1)
    assert (recorded["prompt_tokens"], recorded["completion_tokens"], recorded["errors"]) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens, 0)


@pytest.mark.parametrize("client_asks", [True, False], ids=["usage-asked", "usage-not-asked"])
def test_a_streamed_answer_arrives_over_time_and_its_usage_is_recorded(fleet: Fleet, client_asks: bool) -> None:
    key, key_id = fleet.new_key(f"stream-{client_asks}")
    options = {"stream_options": {"include_usage": True}} if client_asks else {}
    before = fleet.counters()
    with fleet.sdk(key) as client:
        started = time.monotonic()
        stream = client.chat.completions.create(model=MODEL, max_tokens=48, messages=PROMPT, stream=True,
                                                **options, **FIXED)
        text, times, chunks = _content_chunks(stream, started)
    after = fleet.counters()

    assert text.strip() and len(times) >= 20, (text, times)
    # Chunks arrive as the engine makes them (a token every 10-20 ms here), not in one burst at the end: spread
    # over the answer's time, the middle one about halfway.
    span = times[-1] - times[0]
    assert span > 0.05, times
    assert 0.25 * span < times[len(times) // 2] - times[0] < 0.75 * span, times

    served = sorted(engine_usage(before[name], after[name]) for name in before)
    assert served[0] == (0, 0) and served[1][1] == 48, served  # one engine answered, all 48 tokens
    engine_prompt, engine_completion = served[1]
    with_usage = [chunk for chunk in chunks if chunk.usage is not None]
    if client_asks:
        # The engine's usage chunk reaches the client as the engine sent it: the last one, without choices.
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        usage = chunks[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (engine_prompt, engine_completion)
    else:
        # The gateway asked for it itself and kept it from a client that did not.
        assert with_usage == [] and all(chunk.choices for chunk in chunks)
    recorded = fleet.recorded_usage(key, key_id, requests=1)
    assert (recorded["prompt_tokens"], recorded["completion_tokens"], recorded["errors"]) == (
        engine_prompt, engine_completion, 0)


def test_bad_requests_are_answered_400_by_the_gateway_and_reach_no_engine(fleet: Fleet) -> None:
    key, _ = fleet.new_key("bad")
    before = fleet.counters()
    bodies = {
        "malformed JSON": b'{"model": "smollm2", "messages": [',
        "no model": b'{"messages": [{"role": "user", "content": "hi"}]}',
        "model not a string": b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}',
        "not an object": b'["smollm2"]',
    }
    with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
        for what, body in bodies.items():
            answer = http.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, (what, answer.text)
            error = answer.json()["error"]  # OpenAI's shape
            assert set(error) == {"message", "type", "param", "code"}, (what, error)
            assert error["type"] == "invalid_request_error" and error["message"], (what, error)
        missing = http.post("/v1/chat/completions", content=bodies["no model"],
                            headers={"Content-Type": "application/json"}).json()["error"]
        assert missing["param"] == "model" and missing["code"] == "missing_model"
    with fleet.sdk(key) as client, pytest.raises(openai.BadRequestError) as empty_model:
        client.chat.completions.create(model="", messages=PROMPT)
    assert empty_model.value.param == "model"
    after = fleet.counters()
    for name in before:
        assert {k: after[name][k] for k in ENGINE_COUNTERS} == {k: before[name][k] for k in ENGINE_COUNTERS}, name


def test_a_replica_killed_mid_stream_fails_that_stream_cleanly_and_the_other_takes_over(fleet: Fleet) -> None:
    key, key_id = fleet.new_key("kill")
    client = fleet.sdk(key, timeout=60.0)
    stream = client.chat.completions.create(model=MODEL, max_tokens=900, messages=PROMPT, stream=True, **FIXED)
    pieces = 0
    chunks = iter(stream)
    while pieces < 3:
        chunk = next(chunks)
        pieces += sum(1 for choice in chunk.choices if choice.delta.content)
    (busy,) = [t for t in fleet.registry.targets(MODEL) if t.load.outstanding == 1]
    victim = next(engine for engine in fleet.engines if engine.ordinal == busy.ordinal)
    survivor = next(engine for engine in fleet.engines if engine is not victim)
    host = fleet.hosts[victim.worker]
    try:
        fleet.bed.docker(host, "kill", victim.container)
        killed = time.monotonic()
        with pytest.raises(openai.APIError) as failed:
            for _ in chunks:
                pass
        assert time.monotonic() - killed < 5, "the stream should end soon after its engine died"
        assert f"replica {victim.name}" in failed.value.message, failed.value.message
        stream.close()

        # What follows goes to the other replica and succeeds.
        before = survivor.counters()
        replies = [client.chat.completions.create(model=MODEL, max_tokens=8, messages=PROMPT, **FIXED)
                   for _ in range(3)]
        streamed = [_content_chunks(client.chat.completions.create(model=MODEL, max_tokens=8, messages=PROMPT,
                                                                   stream=True, **FIXED), time.monotonic())[0]
                    for _ in range(2)]
        assert all(r.choices[0].message.content for r in replies) and all(s.strip() for s in streamed)
        assert engine_usage(before, survivor.counters())[1] == 5 * 8  # all five on the survivor
        assert not victim.healthy()

        recorded = fleet.recorded_usage(key, key_id, requests=6)
        assert recorded["errors"] == 1  # the stream cut short
        assert recorded["completion_tokens"] == 5 * 8  # its tokens never reported: only the five answers
    finally:
        client.close()
        fleet.bed.docker(host, "start", victim.container, check=False)
        wait_for(f"{victim.name} to serve again", victim.healthy, timeout=90)
