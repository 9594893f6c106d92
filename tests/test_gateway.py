"""The OpenAI-compatible gateway over real HTTP: uvicorn in a thread, stand-in engines as local processes
(tests/testbed/standin.py) behind replica rows in a real PostgreSQL, and the official `openai` SDK as the
client. One test runs the engines in containers on the multi-host test bed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from lmstack.api.app import create_app
from lmstack.api.gateway.registry import Registry
from lmstack.api.security import hash_password, issue_token, new_api_key
from lmstack.api.services.metrics import Metrics
from lmstack.api.state import AppState
from lmstack.config import Settings
from lmstack.state import ApiKey, Database, Deployment, Replica, User

STANDIN = Path(__file__).parent / "testbed" / "standin.py"
JWT_SECRET = "gateway-test-secret-" + "x" * 32
MESSAGES = [{"role": "user", "content": "say hello to the gateway"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- stand-in engines as local processes -----------------------------------------------------------------


def engine_requests(endpoint: str, path: str = "/v1/chat/completions") -> int:
    """How many requests for `path` a stand-in engine has seen (its /metrics)."""
    with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf'standin_requests_total{{path="{re.escape(path)}"}} (\d+)', text)
    return int(found.group(1)) if found else 0


@dataclass
class Standin:
    name: str  # the model name it serves
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, path: str = "/v1/chat/completions") -> int:
        return engine_requests(self.endpoint, path)

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def standins(tmp_path: Path) -> Iterator[Callable[..., Standin]]:
    """Starts stand-in engines on 127.0.0.1 (killed at the end)."""
    started: list[Standin] = []

    def start(name: str = "m", *, token_delay: float = 0.0, port: int | None = None) -> Standin:
        port = port or free_port()
        log = tmp_path / f"standin-{name}-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, str(STANDIN), "--host", "127.0.0.1", "--port", str(port),
                                     "--served-model-name", name, "--token-delay", str(token_delay)],
                                    stdout=out, stderr=subprocess.STDOUT)
        standin = Standin(name, port, log, proc)
        started.append(standin)

        def serving() -> bool:
            assert proc.poll() is None, f"the stand-in exited:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"{standin.endpoint}/health", timeout=1):
                    return True
            except OSError:
                return False

        wait_for(f"the stand-in on port {port}", serving)
        return standin

    yield start
    for standin in started:
        standin.kill()


# -- rows: deployments, replicas, users and keys ----------------------------------------------------------


def add_deployment(db: Database, name: str, *, served: str | None = None, backend: str = "vllm",
                   model: str | None = None) -> dict[str, Any]:
    spec = {"backend": backend, "model": model or f"test/{name}", "servedName": served or name,
            "replicas": 1, "resources": {"gpus": 0}, "args": []}
    with db.session() as session:
        session.add(Deployment(name=name, served_name=served or name, spec=spec, spec_hash="h"))
    return spec


def add_replica(db: Database, deployment: str, ordinal: int, endpoint: str, spec: dict[str, Any], *,
                status: str = "ready", worker: str = "w1") -> None:
    with db.session() as session:
        session.add(Replica(deployment_name=deployment, ordinal=ordinal, worker_name=worker, endpoint=endpoint,
                            spec=spec, spec_hash="h", status=status))


def serve_model(db: Database, engines: list[Standin | str], *, deployment: str = "m", served: str = "m") -> None:
    """A deployment with a Ready replica at each engine (a stand-in, or an endpoint)."""
    spec = add_deployment(db, deployment, served=served)
    for ordinal, engine in enumerate(engines):
        endpoint = engine if isinstance(engine, str) else engine.endpoint
        add_replica(db, deployment, ordinal, endpoint, spec, worker=f"w{ordinal}")


def add_user(db: Database, name: str = "alice", role: str = "viewer") -> None:
    with db.session() as session:
        session.add(User(name=name, password_hash=hash_password("pw"), role=role))


def add_key(db: Database, *, user: str = "alice", models: list[str] | None = None,
            rpm_limit: int | None = None, name: str = "test", scopes: list[str] | None = None) -> tuple[str, int]:
    """A new API key row for `user` (created if missing): (the key, its id)."""
    new = new_api_key()
    with db.session() as session:
        owner = session.query(User).filter_by(name=user).one_or_none()
        if owner is None:
            owner = User(name=user, password_hash=hash_password("pw"), role="viewer")
            session.add(owner)
            session.flush()
        key = ApiKey(name=name, user_id=owner.id, prefix=new.lookup, key_hash=new.digest, models=models,
                     rpm_limit=rpm_limit, scopes=scopes or [])
        session.add(key)
        session.flush()
        return new.token, key.id


# -- the gateway in a thread -------------------------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    app: Any
    sock: socket.socket
    clients: list[openai.OpenAI] = field(default_factory=list)

    @property
    def state(self) -> AppState:
        state: AppState = self.app.state.lmstack
        return state

    def sdk(self, key: str, **options: Any) -> openai.OpenAI:
        """The official SDK against the gateway; no SDK retries, so what the gateway does is what is seen."""
        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0,
                               timeout=options.pop("timeout", 30.0), **options)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        assert not self.thread.is_alive(), "the gateway did not stop"


@pytest.fixture
def start_gateway(db: Database, database_url: str) -> Iterator[Callable[..., Gateway]]:
    """Starts the app (uvicorn, real HTTP on 127.0.0.1) on the test database; stopped at the end."""
    running: list[Gateway] = []

    def start(*, database: Database = db, **overrides: Any) -> Gateway:
        options: dict[str, Any] = {"database_url": database_url, "jwt_secret": JWT_SECRET,
                                   "registry_refresh_s": 0.1, "usage_flush_s": 0.1, "key_cache_s": 1.0,
                                   **overrides}
        app = create_app(Settings(**options), database=database)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))  # bound here, handed to uvicorn: no race for a free port
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        gateway = Gateway(f"http://127.0.0.1:{port}", server, thread, app, sock)
        running.append(gateway)
        wait_for("the gateway to start", lambda: server.started or not thread.is_alive())
        assert server.started, "the gateway did not start"
        return gateway

    yield start
    for gateway in running:
        if gateway.thread.is_alive():
            gateway.stop()


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


def wait_until_routed(gateway: Gateway, model: str, replicas: int) -> None:
    wait_for(f"{replicas} replicas of {model} in the registry",
             lambda: len(gateway.state.registry.targets(model)) == replicas)


def chat(client: openai.OpenAI, model: str = "m", **kwargs: Any) -> Any:
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model=model, **kwargs)


# -- tests ------------------------------------------------------------------------------------------------


def test_models_chat_completions_and_embeddings_through_the_sdk(db, standins, start_gateway):
    engine = standins("m")
    serve_model(db, [engine])
    add_deployment(db, "idle")  # a deployment without a Ready replica is not listed
    key, _ = add_key(db)
    gateway = start_gateway()
    client = gateway.sdk(key)

    models = client.models.list()
    assert [m.id for m in models.data] == ["m"]
    assert models.data[0].owned_by == "lmstack" and models.data[0].object == "model"
    assert client.models.retrieve("m").id == "m"

    reply = chat(client)
    assert reply.choices[0].message.content.startswith("Hello from m")
    assert reply.usage is not None and reply.usage.prompt_tokens == 5

    text = client.completions.create(model="m", prompt="one two three")
    assert text.choices[0].text.startswith("Hello from m") and text.usage.prompt_tokens == 3

    vectors = client.embeddings.create(model="m", input=["a b", "c"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 16
    assert vectors.usage.prompt_tokens == 3


def test_stream_arrives_chunk_by_chunk(db, standins, start_gateway):
    engine = standins("m", token_delay=0.1)
    serve_model(db, [engine])
    key, _ = add_key(db)
    client = start_gateway().sdk(key)

    started = time.monotonic()
    arrivals: list[float] = []
    pieces: list[str] = []
    for chunk in chat(client, stream=True):
        arrivals.append(time.monotonic() - started)
        assert chunk.choices, "the usage chunk the gateway asked for reached a client that did not ask"
        pieces.append(chunk.choices[0].delta.content or "")
    text = "".join(pieces)
    assert text.startswith("Hello from m")
    words = len(text.split())
    assert len(arrivals) >= words  # one chunk per word, not one blob
    # The engine takes ~0.1 s per word: chunks arrive as they are made, not all at the end.
    assert arrivals[-1] - arrivals[1] >= 0.5 * 0.1 * (words - 1)
    assert arrivals[1] < arrivals[-1] / 2


def test_stream_usage_chunk_only_for_clients_that_ask(db, standins, start_gateway):
    engine = standins("m")
    serve_model(db, [engine])
    key, _ = add_key(db)
    client = start_gateway().sdk(key)

    asked = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert asked[-1].choices == [] and asked[-1].usage is not None
    assert asked[-1].usage.prompt_tokens == 5
    not_asked = list(chat(client, stream=True))
    assert all(chunk.choices for chunk in not_asked)
    assert len(not_asked) == len(asked) - 1


def test_request_errors_in_openai_shape(db, standins, start_gateway):
    engine = standins("m")
    serve_model(db, [engine])
    spec = add_deployment(db, "other")
    add_replica(db, "other", 0, engine.endpoint, spec)  # Ready; the engine does not serve it, but unused here
    add_deployment(db, "down")  # known, no Ready replica
    key, _ = add_key(db)
    limited, _ = add_key(db, models=["m"], rpm_limit=2, name="limited")
    gateway = start_gateway()
    client = gateway.sdk(key)

    with pytest.raises(openai.AuthenticationError):
        gateway.sdk("lmsk_" + "x" * 43).models.list()
    with pytest.raises(openai.AuthenticationError):
        chat(gateway.sdk("not-a-token"))
    with pytest.raises(openai.NotFoundError) as missing:
        chat(client, model="nope")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.InternalServerError) as down:
        chat(client, model="down")
    assert down.value.status_code == 503

    only_m = gateway.sdk(limited)
    assert [m.id for m in only_m.models.list().data] == ["m"]  # "other" is Ready but not allowed
    with pytest.raises(openai.PermissionDeniedError):
        chat(only_m, model="other")
    chat(only_m)
    chat(only_m)
    with pytest.raises(openai.RateLimitError) as limited_error:
        chat(only_m)  # the third within the minute (the refused one and the models listing do not count)
    assert int(limited_error.value.response.headers["retry-after"]) >= 1

    # The body is read once and checked before any engine sees it.
    before = engine.requests()
    with httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {key}"}) as http:
        for body in (b'{"messages": [', b'"just a string"', json.dumps({"messages": MESSAGES}).encode(),
                     json.dumps({"model": 7, "messages": MESSAGES}).encode(), b"\xff\xfe"):
            answer = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400, answer.text
            error = answer.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        missing_model = http.post("/v1/chat/completions", json={"messages": MESSAGES}).json()["error"]
        assert missing_model["param"] == "model" and "model" in missing_model["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(messages=MESSAGES, model="")  # type: ignore[arg-type]
    assert engine.requests() == before

    # The engine's own client errors come back as they are (not retried, not a 5xx).
    with pytest.raises(openai.BadRequestError) as engine_says:
        client.chat.completions.create(model="m", messages=[])
    assert engine_says.value.param == "messages" and engine.requests() == before + 1


def test_a_body_over_the_limit_is_413_and_other_methods_are_405(db, standins, start_gateway):
    engine = standins("m")
    serve_model(db, [engine])
    key, _ = add_key(db)
    gateway = start_gateway(max_request_mb=0.01)  # 10 KiB
    before = engine.requests()
    with httpx.Client(base_url=gateway.url, headers={"authorization": f"Bearer {key}"}) as http:
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 20_000}]}
        answer = http.post("/v1/chat/completions", json=big)
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "request_too_large" and "LMSTACK_MAX_REQUEST_MB" in answer.text
        assert http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES}).status_code == 200
        wrong_method = http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
        # Unauthenticated: refused before the body is even read.
        anonymous = httpx.post(f"{gateway.url}/v1/embeddings", json={"model": "m", "input": "x"})
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_api_key"
    assert engine.requests() == before + 1


def test_an_unexpected_failure_is_a_logged_500_in_openai_shape(db, standins, start_gateway, caplog):
    engine = standins("m")
    serve_model(db, [engine])
    key, _ = add_key(db)
    gateway = start_gateway()

    def broken_registry(model: str) -> bool:
        raise RuntimeError("registry bug")

    gateway.state.registry.knows = broken_registry  # type: ignore[method-assign]
    with caplog.at_level("ERROR", logger="lmstack.api"), pytest.raises(openai.InternalServerError) as failed:
        chat(gateway.sdk(key))
    assert failed.value.status_code == 500 and "server log" in failed.value.message
    assert any("unhandled error on POST /v1/chat/completions" in r.getMessage() and r.exc_info for r in caplog.records)
    assert "registry bug" not in failed.value.response.text  # details stay in the log


def test_a_dead_replica_is_retried_on_the_other(db, standins, start_gateway):
    alive, dead = standins("m"), standins("m")
    serve_model(db, [alive, dead])
    key, _ = add_key(db)
    gateway = start_gateway()
    client = gateway.sdk(key)
    dead.kill()  # its row stays Ready

    started = time.monotonic()
    for _ in range(20):
        assert chat(client).choices[0].message.content.startswith("Hello")
    for _ in range(5):
        assert "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True)).startswith("Hello")
    assert [m.id for m in client.models.list().data] == ["m"]
    assert alive.requests() == 25
    # After a failure the dead replica is suspect, and skipped, for 5 s: it was tried about once per 5 s.
    assert 1 <= gateway.state.registry.counters.retries <= 2 + (time.monotonic() - started) / 5


def test_power_of_two_choices_spreads_concurrent_streams(db, standins, start_gateway):
    engines = [standins("m", token_delay=0.05), standins("m", token_delay=0.05)]
    serve_model(db, engines)
    key, _ = add_key(db)
    gateway = start_gateway()
    client = gateway.sdk(key)

    def one(_: int) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True))

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(32)))
    assert all(reply.startswith("Hello") for reply in replies)
    counts = [engine.requests() for engine in engines]
    assert sum(counts) == 32 and min(counts) >= 8, counts  # requests in flight steer new ones away
    assert [t.load.outstanding for t in gateway.state.registry.targets("m")] == [0, 0]


def test_client_disconnect_closes_the_upstream_stream(db, standins, start_gateway):
    engine = standins("m", token_delay=0.3)
    serve_model(db, [engine])
    key, _ = add_key(db)
    gateway = start_gateway()
    client = gateway.sdk(key)

    stream = chat(client, stream=True)
    next(stream)
    next(stream)
    stream.close()  # the client goes away mid-stream
    wait_for("the engine to see the client go", lambda: "client went away during a stream" in engine.output())
    wait_for("the request to leave the registry's count",
             lambda: gateway.state.registry.targets("m")[0].load.outstanding == 0)
    assert gateway.state.registry.counters.client_disconnects == 1


def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error(db, standins, start_gateway):
    engine = standins("m", token_delay=0.3)
    serve_model(db, [engine])
    key, _ = add_key(db)
    client = start_gateway().sdk(key, timeout=20.0)

    stream = chat(client, stream=True)
    next(stream)
    started = time.monotonic()
    engine.kill()
    with pytest.raises(openai.APIError) as failed:
        for _ in stream:
            pass
    assert time.monotonic() - started < 5
    assert "ended the stream before it was complete" in failed.value.message


def test_a_client_giving_up_before_the_answer_abandons_the_upstream_request(db, start_gateway, broken):
    hanging, server = broken("hang")
    serve_model(db, [hanging])
    key, _ = add_key(db)
    gateway = start_gateway()
    registry = gateway.state.registry

    with pytest.raises(openai.APITimeoutError):
        chat(gateway.sdk(key, timeout=0.5))
    wait_for("the gateway to notice", lambda: registry.counters.client_disconnects == 1, timeout=2)
    assert registry.targets("m")[0].load.outstanding == 0
    assert server.hits == 1  # type: ignore[attr-defined]

    # The gateway starts watching for a disconnect only once a request has run for a moment (WATCH_AFTER_S);
    # a client gone within milliseconds must be seen too, long before the engine's 3 s are up.
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.005)
    left = time.monotonic()
    wait_for("the gateway to notice", lambda: registry.counters.client_disconnects == 2, timeout=2)
    assert time.monotonic() - left < 1.0
    assert registry.targets("m")[0].load.outstanding == 0


def test_sse_framing_survives_any_split():
    from lmstack.api.gateway.proxy import _SseFramer

    stream = (b'data: {"a": 1}\n\n' b'data: {"b": 2}\r\n\r\n' b": comment\n\n"
              b'event: x\ndata: {"c": 3}\n\n' b"data: [DONE]\n\n")
    whole = _SseFramer().feed(stream)
    assert len(whole) == 5 and b"".join(whole) == stream
    for size in (1, 2, 3, 7, 16):
        framer = _SseFramer()
        events = [e for i in range(0, len(stream), size) for e in framer.feed(stream[i:i + size])]
        assert events == whole and framer.tail() == b""


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=60).map(lambda b: bytes(b"ab\n\r:"[x % 5] for x in b)),
       cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=6))
def test_sse_framing_is_the_same_however_the_bytes_arrive(stream: bytes, cuts: list[int]) -> None:
    """Whatever the line ends (LF, CRLF, CR, mixed) and wherever the chunks split, the events are the ones a
    plain scan for the three blank-line terminators finds, and no byte is lost or added."""
    from lmstack.api.gateway.proxy import _SseFramer

    ends = [m.end() for m in re.finditer(rb"\r\n\r\n|\n\n|\r\r", stream)]
    expected = [stream[a:b] for a, b in zip([0, *ends], ends, strict=False)]
    framer = _SseFramer()
    bounds = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    events = [e for a, b in itertools.pairwise(bounds) for e in framer.feed(stream[a:b])]
    if bounds == [0]:
        events = framer.feed(b"")
    tail = framer.tail()
    assert events == expected and b"".join(events) + tail == stream


class _Broken(BaseHTTPRequestHandler):
    """An engine that fails: 500 for every request, or (by mode) never answers, ends its stream at once,
    redirects, closes the connection without answering (`drop`), or answers the first request on a
    connection and closes it when the next one comes (`drop-reused`, like an engine whose keep-alive timeout
    ends just as the gateway reuses the connection; `reset-reused`: the same with a reset)."""

    protocol_version = "HTTP/1.1"
    mode = "500"
    served = 0  # requests answered on this connection (one handler per connection)

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        if self.mode == "reset-reused" and self.served:  # reset (RST), the body unread
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.mode == "drop" or (self.mode == "drop-reused" and self.served):
            self.close_connection = True
            return
        self.served += 1
        if self.mode in ("drop-reused", "reset-reused"):
            self._json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "kept alive"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
            return
        if self.mode == "hang":
            time.sleep(3)
            return
        if self.mode == "redirect":
            self.send_response(307)
            self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.mode == "empty-stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            return
        self._json(500, {"error": {"message": "CUDA out of memory", "type": "InternalServerError"}})

    def _json(self, status: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def broken() -> Iterator[Callable[[str], tuple[str, ThreadingHTTPServer]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(mode: str) -> tuple[str, ThreadingHTTPServer]:
        handler = type("Handler", (_Broken,), {"mode": mode})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.hits = 0  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_an_engine_redirect_is_relayed_not_followed(db, start_gateway, broken):
    redirecting, server = broken("redirect")
    serve_model(db, [redirecting])
    key, _ = add_key(db)
    gateway = start_gateway()
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES},
                        headers={"authorization": f"Bearer {key}"}, follow_redirects=False)
    assert answer.status_code == 307
    assert server.hits == 1  # type: ignore[attr-defined]  # the body was not sent on to /elsewhere


@pytest.mark.parametrize("mode", ["500", "empty-stream"])
def test_a_failing_replica_is_retried_before_the_answer_starts(db, standins, start_gateway, broken, mode):
    engine = standins("m")
    bad_url, bad = broken(mode)
    spec = add_deployment(db, "m")
    add_replica(db, "m", 0, bad_url, spec)
    add_replica(db, "m", 1, engine.endpoint, spec)
    key, _ = add_key(db, scopes=["metrics"])
    gateway = start_gateway()
    client = gateway.sdk(key)

    for _ in range(10):
        pieces = [c.choices[0].delta.content or "" for c in chat(client, stream=True)]
        assert "".join(pieces).startswith("Hello")
    assert bad.hits >= 1  # type: ignore[attr-defined]
    # Each failure is in /metrics, by the reason it failed.
    metrics = httpx.get(f"{gateway.url}/metrics", headers={"authorization": f"Bearer {key}"}).text
    reason = "status" if mode == "500" else "stream"
    assert f'lmstack_upstream_failures_total{{model="m",reason="{reason}"}} {bad.hits}.0' in metrics  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["drop-reused", "reset-reused"])
def test_a_kept_alive_connection_the_engine_closed_is_retried_on_a_new_one(db, start_gateway, broken, mode):
    engine, server = broken(mode)
    serve_model(db, [engine])
    key, _ = add_key(db)
    gateway = start_gateway()
    client = gateway.sdk(key)

    # A long prompt: reset while the gateway still writes it, the connection fails as the body goes out.
    long = [{"role": "user", "content": "x" * (8 << 20 if mode == "reset-reused" else 10)}]
    for _ in range(3):
        assert chat(client, messages=long).choices[0].message.content == "kept alive"
    # The 2nd and 3rd requests found their pooled connection closed by the engine, and went again on a new one.
    assert server.hits == 5  # type: ignore[attr-defined]
    assert gateway.state.registry.counters.reconnects == 2
    (replica,) = gateway.state.registry.snapshot()
    assert replica["failures"] == 0 and not replica["suspect"]  # not the replica's failure


def test_an_engine_that_closes_a_new_connection_without_answering_is_a_502(db, start_gateway, broken):
    engine, server = broken("drop")
    serve_model(db, [engine])
    key, _ = add_key(db)
    gateway = start_gateway()

    with pytest.raises(openai.InternalServerError) as failed:
        chat(gateway.sdk(key))
    assert failed.value.status_code == 502
    assert "closed the connection before answering" in failed.value.message
    assert server.hits == 1  # type: ignore[attr-defined]  # not sent again: the engine did read it
    (replica,) = gateway.state.registry.snapshot()
    assert replica["failures"] == 1 and replica["suspect"]


def test_a_5xx_that_repeats_on_a_second_replica_is_relayed_and_marks_neither(db, start_gateway, broken):
    """The request, not the replicas, is at fault when two replicas fail it alike (an image sent to a text-only
    model): the client gets the engine's status and message, and both replicas keep taking requests."""
    spec = add_deployment(db, "m")
    servers = []
    for ordinal in range(2):
        url, server = broken("500")
        add_replica(db, "m", ordinal, url, spec)
        servers.append(server)
    key, _ = add_key(db)
    gateway = start_gateway()

    with pytest.raises(openai.InternalServerError) as failed:
        chat(gateway.sdk(key))
    assert failed.value.status_code == 500 and "CUDA out of memory" in failed.value.message
    assert "on another replica" in failed.value.message
    assert [server.hits for server in servers] == [1, 1]  # each asked once
    assert [(r["failures"], r["suspect"]) for r in gateway.state.registry.snapshot()] == [(0, False), (0, False)]


def test_the_gateway_posts_reached_through_fastapi_answer_with_the_same_handler(db, standins, database_url):
    """The app answers the gateway's POSTs before FastAPI routes them (its fast path). Reached through FastAPI
    anyway (another ASGI wrapper in front of it, say), the routes give the same answers: no decoy routes."""
    serve_model(db, [standins("m")])
    key, _ = add_key(db)
    app = create_app(Settings(database_url=database_url, jwt_secret=JWT_SECRET, registry_refresh_s=0.1),
                     database=db)

    async def through_fastapi(scope: Any, receive: Any, send: Any) -> None:
        await FastAPI.__call__(app, scope, receive, send)

    with TestClient(through_fastapi) as client:
        body = {"model": "m", "messages": MESSAGES}
        wait_for("the model routed", lambda: client.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}).status_code == 200)
        answer = client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"})
        assert answer.json()["choices"][0]["message"]["content"].startswith("Hello")
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                           headers={"authorization": f"Bearer {key}"}) as streamed:
            assert streamed.status_code == 200 and "data: [DONE]" in "".join(streamed.iter_text())
        refused = client.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer lmsk_wrong"})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_every_replica_failing_is_a_502_and_a_silent_one_a_504(db, start_gateway, broken):
    failing, _ = broken("500")
    hanging, _ = broken("hang")
    spec = add_deployment(db, "m")
    add_replica(db, "m", 0, failing, spec)
    spec_h = add_deployment(db, "h")
    add_replica(db, "h", 0, hanging, spec_h)
    key, _ = add_key(db)
    client = start_gateway(upstream_read_timeout_s=0.5).sdk(key)

    with pytest.raises(openai.InternalServerError) as failed:
        chat(client)
    assert failed.value.status_code == 502 and "CUDA out of memory" in failed.value.message
    with pytest.raises(openai.InternalServerError) as silent:
        chat(client, model="h")
    assert silent.value.status_code == 504


def test_the_upstream_model_name_comes_from_the_backend(db, standins, start_gateway):
    engine = standins("llama3.2:1b")  # Ollama serves the model by its tag
    spec = add_deployment(db, "llama", served="llama", backend="ollama", model="llama3.2:1b")
    add_replica(db, "llama", 0, engine.endpoint, spec)
    key, _ = add_key(db)
    client = start_gateway().sdk(key)

    assert [m.id for m in client.models.list().data] == ["llama"]
    assert chat(client, model="llama").choices[0].message.content.startswith("Hello from llama3.2:1b")


def test_the_registry_reads_each_replicas_own_spec_again_when_it_changes(db):
    """An in-place update (Ollama pulls another model) rewrites the replica's stored spec: the next refresh
    routes by the new one. A stored spec that does not validate is routed by the deployment's name."""
    spec = add_deployment(db, "llama", served="chat", backend="ollama", model="llama3.2:1b")
    add_replica(db, "llama", 0, "http://10.9.9.9:11434", spec)
    add_replica(db, "odd", 0, "http://10.9.9.9:8000", {"backend": "tgi", "servedName": "x"})
    registry = Registry(db, refresh_s=60, metrics=Metrics())

    def routes() -> dict[str, list[str]]:
        asyncio.run(registry.refresh())
        return {name: [t.upstream_model for t in registry.targets(name)] for name in ("chat", "phi", "odd", "x")}

    assert routes() == {"chat": ["llama3.2:1b"], "phi": [], "odd": ["odd"], "x": []}
    with db.session() as session:
        replica = session.scalars(select(Replica).where(Replica.deployment_name == "llama")).one()
        replica.spec = {**spec, "model": "phi3:mini", "servedName": "phi"}
    assert routes() == {"chat": [], "phi": ["phi3:mini"], "odd": ["odd"], "x": []}


def test_login_tokens_work_and_replicas_appear_without_a_restart(db, standins, start_gateway):
    add_user(db, "root", role="admin")
    token, _ = issue_token(JWT_SECRET, user="root", role="admin", ttl_s=600)
    gateway = start_gateway()
    client = gateway.sdk(token)
    assert client.models.list().data == []

    engine = standins("late")
    serve_model(db, [engine], deployment="late", served="late")
    wait_until_routed(gateway, "late", 1)
    assert chat(client, model="late").choices[0].message.content.startswith("Hello from late")


def test_replicas_in_containers_on_two_test_hosts(clean_testbed, standin_image, db, start_gateway):
    bed = clean_testbed
    port = 18100
    hosts = bed.hosts[:2]
    for host in hosts:
        bed.docker(host, "run", "-d", "--name", "gateway-m", "--network", "host", "--label", "lmstack.test=gateway",
                   standin_image, "--served-model-name", "m", "--port", str(port), "--token-delay", "0.01")
    spec = add_deployment(db, "m")
    for ordinal, host in enumerate(hosts):
        add_replica(db, "m", ordinal, f"http://{host.address}:{port}", spec, worker=host.name)

    def serving(address: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{address}:{port}/v1/models", timeout=1):
                return True
        except OSError:
            return False

    for host in hosts:
        wait_for(f"the stand-in on {host.name}", lambda h=host: serving(h.address), timeout=30)
    key, _ = add_key(db)
    client = start_gateway().sdk(key)

    for _ in range(10):
        assert chat(client).choices[0].message.content.startswith("Hello from m on ")
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True))
    assert streamed.startswith("Hello from m on ")
    counts = [engine_requests(f"http://{host.address}:{port}") for host in hosts]
    assert sum(counts) == 11 and min(counts) >= 1, counts  # both hosts answered


def test_gateway_debug_figures_are_plain_counters(db, standins, start_gateway):
    engine = standins("m")
    serve_model(db, [engine])
    key, _ = add_key(db)
    gateway = start_gateway()
    chat(gateway.sdk(key))
    (replica,) = gateway.state.registry.snapshot()
    assert replica["replica"] == "m/0" and replica["requests"] == 1 and replica["outstanding"] == 0
