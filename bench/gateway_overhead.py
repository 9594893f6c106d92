"""What lmstack's OpenAI-compatible gateway adds to a request: direct to an engine vs through `lmstack serve`
(and through LiteLLM's proxy on the same engine, when one is given), non-streaming and streaming.

    .venv/bin/python bench/gateway_overhead.py
    .venv/bin/python bench/gateway_overhead.py --litellm-python /tmp/litellm/bin/python   # adds LiteLLM rows
    .venv/bin/python bench/gateway_overhead.py --concurrency 1 256 --duration 5 --profile py-spy

Needs a PostgreSQL on 127.0.0.1:5432 with trust auth for user postgres (LMSTACK_TEST_POSTGRES overrides the
admin URL); a throwaway database is created for the run and dropped at the end. The LiteLLM rows need
`litellm[proxy]` in a separate virtual environment (it is not one of lmstack's dependencies):

    python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'

Processes, each on its own (and all stopped at the end, also on Ctrl-C or SIGTERM):
  - the upstream: a small, fast stand-in engine (a bare ASGI app under uvicorn with uvloop and httptools)
    answering POST /v1/chat/completions (JSON, or a stream of a few SSE chunks ending in `data: [DONE]`, with
    the usage chunk when `stream_options.include_usage` asks for it, as vLLM does) and GET /v1/models;
  - lmstack: exactly `lmstack serve` (uvicorn; no access log, its default) on the throwaway database holding a
    user, an API key and one Ready replica row pointing at the upstream; default settings otherwise;
  - the floor: a bare pass-through on lmstack's own stack (uvicorn with uvloop and httptools, lmstack's client to the
    upstream) doing nothing else, so "%direct" can be read against what the stack itself allows here;
  - LiteLLM (optional): `litellm --config` with one model_list entry `openai/<model>` whose api_base is the
    upstream, a master key and no database;
  - the load generator, one process per row: asyncio on uvloop, one keep-alive connection per concurrent
    client, requests written as bytes and answers parsed by httptools (so the client is cheap, and the same
    for every target). A closed loop: each of C clients sends its next request when the last one ends.

Each row: a warm-up not counted (at least `--warmup` seconds, and until every client has had an answer, so
a slow target is measured in its steady state), then `--duration` seconds measured: the answers that end in
that window count, requests still in flight when it closes are abandoned. Rows run interleaved (for each mode
and concurrency: direct, lmstack, LiteLLM) so a change in the machine's load hits them alike. Latency is to
the end of the answer; for streams also to the first chunk of the body (TTFB). "added" is through minus
direct at the same percentile, mode and concurrency (the difference of the percentiles). "cpu/req" is the
CPU time the proxy's processes (in direct rows, the upstream's) used in the window per answer counted.

Profiling (`--profile cprofile|py-spy`, or LMSTACK_BENCH_PROFILE=...): after the table, the gateway is run
again under load (`--profile-load`, default plain:1 and plain:256) and what its event loop spends time on is
printed: by package and by function. cProfile is switched on and off inside the gateway process by signals
(after the warm-up), py-spy (found on PATH or given by --py-spy) samples it from outside.

Figures only, no assertions: the targets are printed beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MODEL = "bench"
PROMPT = [{"role": "user", "content": "Say hello to the benchmark in five words."}]
PIECES = ["Hello", " there,", " dear", " benchmark", " reader."]
TARGET_ADDED_P50_MS = 1.0  # at concurrency 1
LITELLM_METHOD_CONCURRENCY = [1, 16, 64]
TARGET_THROUGHPUT = 0.90  # of direct, at concurrency 256
SETUP_TIMEOUT_S = 90.0
MAX_EXTRA_WARMUP_S = 30.0  # a row's warm-up waits this much longer at most for every client's first answer


# ============================================================================================================
# The upstream stand-in engine (run as `gateway_overhead.py --role upstream`)
# ============================================================================================================


def _upstream_app(model: str, token_delay_s: float, answer_delay_s: float = 0.0) -> Any:
    created = int(time.time())
    ident = "chatcmpl-bench0123456789"
    usage = {"prompt_tokens": 12, "completion_tokens": len(PIECES), "total_tokens": 12 + len(PIECES)}
    whole = json.dumps({
        "id": ident, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(PIECES)},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage}, separators=(",", ":")).encode()

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": piece}) for piece in PIECES]
    events.append(event({}, "stop"))
    usage_event = b"data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                          "model": model, "choices": [], "usage": usage},
                                         separators=(",", ":")).encode() + b"\n\n"
    models = json.dumps({"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                                     "owned_by": "bench"}]}).encode()
    json_headers = [(b"content-type", b"application/json")]
    sse_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]

    async def reply(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": json_headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":
            await reply(send, 200, b"{}")
            return
        if method == "GET" and path == "/v1/models":
            await reply(send, 200, models)
            return
        if method != "POST" or path != "/v1/chat/completions":
            await reply(send, 404, b'{"error":{"message":"not found"}}')
            return
        raw, more = b"", True
        while more:
            message = await receive()
            raw += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            request = json.loads(raw)
        except ValueError:
            await reply(send, 400, b'{"error":{"message":"invalid JSON"}}')
            return
        if answer_delay_s:  # a fixed time to answer, as LiteLLM's benchmark's fake endpoint takes
            await asyncio.sleep(answer_delay_s)
        if request.get("stream") is not True:
            if token_delay_s:  # a whole answer comes once all its tokens are generated
                await asyncio.sleep(token_delay_s * len(events))
            await reply(send, 200, whole)
            return
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
        for chunk in events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if token_delay_s:
                await asyncio.sleep(token_delay_s)
        tail = (usage_event if include_usage else b"") + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    return app


def run_upstream(port: int, model: str, token_delay_ms: float, answer_delay_ms: float = 0.0) -> None:
    import uvicorn

    config = uvicorn.Config(_upstream_app(model, token_delay_ms / 1000, answer_delay_ms / 1000), host="127.0.0.1",
                            port=port,
                            loop="uvloop", http="httptools", lifespan="off", access_log=False,
                            log_level="warning", backlog=4096)
    uvicorn.Server(config).run()


# ============================================================================================================
# The floor (run as `gateway_overhead.py --role floor --port P --upstream-port U`)
# ============================================================================================================


def run_floor(port: int, upstream_port: int) -> None:
    """A bare pass-through on lmstack's stack (uvicorn with uvloop and httptools, lmstack's upstream client, the
    same garbage-collector settings as `lmstack serve`) and nothing else: no auth, routing, usage, metrics or
    failover. What any gateway built on this stack could do at most, on this machine."""
    import uvicorn

    from lmstack.api.gateway.upstream import UpstreamClient
    from lmstack.api.server import tune_gc

    upstream = f"http://127.0.0.1:{upstream_port}"
    client: list[UpstreamClient] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if not client:
            client.append(UpstreamClient(connect_timeout_s=10.0, read_timeout_s=300.0, keepalive_s=4.0))
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        answer = await client[0].request(scope["method"], upstream, scope["path"], body, headers)
        try:
            await send({"type": "http.response.start", "status": answer.status,
                        "headers": [(b"content-type", answer.headers.get("content-type", "").encode())]})
            async for chunk in answer.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            answer.close()

    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="off",
                            access_log=False, log_level="warning", backlog=4096)
    tune_gc()
    uvicorn.Server(config).run()


# ============================================================================================================
# The load generator (run as `gateway_overhead.py --role loadgen --spec JSON`; prints one JSON line)
# ============================================================================================================


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; answers parsed by httptools."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import httptools

        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[float] | None = None
        self.status = 0
        self.first = 0.0
        self.body: list[bytes] = []
        self.keep_alive = True

    # -- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # httptools.HttpParserError and friends
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    # -- httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if not self.first:
            self.first = time.perf_counter()
        self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(time.perf_counter())

    def _fail(self, exc: BaseException) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def request(self, data: bytes) -> float:
        self.status, self.first, self.body = 0, 0.0, []
        self.waiter = self.loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        return await self.waiter


def _request_bytes(spec: dict[str, Any]) -> bytes:
    body = json.dumps({"model": spec["model"], "messages": PROMPT, "max_tokens": 16,
                       "stream": spec["stream"]}, separators=(",", ":")).encode()
    head = (f"POST {spec['path']} HTTP/1.1\r\nHost: {spec['host']}:{spec['port']}\r\n"
            f"Content-Type: application/json\r\nAccept: {'text/event-stream' if spec['stream'] else 'application/json'}"
            f"\r\nAuthorization: Bearer {spec['key']}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: `concurrency` clients, each sending its next request when its last one ends.

    Warm-up: at least `warmup_s`, and until every client has had an answer (so a slow target is measured in
    its steady state, not while its first requests queue), at most `warmup_s + MAX_EXTRA_WARMUP_S`. Then
    `duration_s` measured: the requests that end in that window count; those still in flight when it ends
    are abandoned. The CPU time of the process tree `spec["pid"]` is read at both ends of the window.
    """
    loop = asyncio.get_running_loop()
    data = _request_bytes(spec)
    stream = spec["stream"]
    done: list[tuple[float, float, float]] = []  # (began, first body chunk, ended) of good answers
    errors: Counter[str] = Counter()
    answered = [0] * spec["concurrency"]
    stopping = [False]

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(lambda: _Connection(loop), spec["host"], spec["port"])
        return conn

    async def client(index: int) -> None:
        conn: _Connection | None = None
        try:
            # The flag, not only cancel(): on 3.11 asyncio.wait_for swallows a cancel that arrives as the
            # awaited answer completes, and the client would go on for ever.
            while not stopping[0]:
                began = time.perf_counter()
                try:
                    if conn is None or conn.closed:
                        async with asyncio.timeout(10):
                            conn = await connect()
                    async with asyncio.timeout(60):
                        ended = await conn.request(data)
                except (OSError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    answered[index] += 1
                    if conn is not None and conn.transport is not None:
                        conn.transport.close()
                    conn = None
                    await asyncio.sleep(0.01)
                    continue
                except Exception as exc:  # the answer could not be parsed
                    errors[f"{type(exc).__name__}: {exc}"[:80]] += 1
                    answered[index] += 1
                    if conn is not None and conn.transport is not None:
                        conn.transport.close()
                    conn = None
                    continue
                answered[index] += 1
                body = b"".join(conn.body)
                if conn.status != 200:
                    errors[f"HTTP {conn.status}: {body[:120].decode(errors='replace')}"] += 1
                elif stream and not body.rstrip().endswith(b"data: [DONE]"):
                    errors["stream without data: [DONE]"] += 1
                elif not stream and b'"choices"' not in body:
                    errors["answer without choices"] += 1
                else:
                    done.append((began, conn.first, ended))
                if not conn.keep_alive:
                    conn.transport.close()  # type: ignore[union-attr]
                    conn = None
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    clients = [asyncio.ensure_future(client(i)) for i in range(spec["concurrency"])]
    started = time.perf_counter()
    await asyncio.sleep(spec["warmup_s"])
    while not all(answered) and time.perf_counter() - started < spec["warmup_s"] + MAX_EXTRA_WARMUP_S:
        await asyncio.sleep(0.05)
    cpu_before = tree_cpu_s(spec["pid"])
    Path(spec["out"] + ".measuring").touch()  # for a profiler to start now
    measure_from = time.perf_counter()
    errors_before = sum(errors.values())
    await asyncio.sleep(spec["duration_s"])
    end_at = time.perf_counter()
    cpu = tree_cpu_s(spec["pid"]) - cpu_before
    window_errors = sum(errors.values()) - errors_before
    stopping[0] = True
    for task in clients:
        task.cancel()
    await asyncio.wait(clients, timeout=10)
    counted = [d for d in done if measure_from <= d[2] < end_at]
    # The longest time in the window without any answer ending: a stall shows here.
    ends = [measure_from, *sorted(d[2] for d in counted), end_at]
    gap = max(b - a for a, b in itertools.pairwise(ends))
    timeline = Counter(int((d[2] - started) * 2) for d in done)  # answers per half second, warm-up included
    return {"latency_us": [int((e - b) * 1e6) for b, _, e in counted],
            "first_us": [int((f - b) * 1e6) for b, f, _ in counted] if stream else [],
            "errors": dict(errors), "window_errors": window_errors, "window_s": end_at - measure_from,
            "warmup_s": measure_from - started, "cpu_s": cpu, "max_gap_s": gap,
            "timeline": [timeline.get(i, 0) for i in range(int((end_at - started) * 2) + 1)]}


def run_loadgen(spec: dict[str, Any]) -> None:
    import uvloop

    result = uvloop.run(_loadgen(spec))
    # To a file, not stdout: a pipe left non-blocking would cut a big answer at 64 KiB.
    Path(spec["out"]).write_text(json.dumps(result))


# ============================================================================================================
# The orchestrator
# ============================================================================================================


class Procs:
    """Child processes, each in its own session (Ctrl-C reaches only this script), stopped in reverse order."""

    def __init__(self) -> None:
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], *, log: Path | None = None, env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen[bytes]:
        out: Any = stdout if stdout is not None else (log.open("ab") if log else subprocess.DEVNULL)
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if log else None, env=env,
                                start_new_session=True, cwd=REPO_ROOT)
        if log:
            out.close()
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait_s: float = 15.0) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # its own process group (start_new_session): it and any children
            deadline = time.monotonic() + wait_s
            # Waited for without reaping it: until it is reaped its id (= the group's) cannot be reused.
            while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of that group
            proc.wait(10)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, ready: Any, proc: subprocess.Popen[bytes] | None, log: Path | None,
               timeout: float = SETUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})\n{tail}")
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.1)


def http_get(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def chat_once(port: int, path: str, key: str, *, stream: bool) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        body = json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": 16, "stream": stream})
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                         "Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += times.get(current, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == current)
    return total


# -- the database --------------------------------------------------------------------------------------------


@dataclass
class ThrowawayDatabase:
    admin_url: str
    name: str = field(default_factory=lambda: f"lmstack_bench_{secrets.token_hex(4)}")
    created: bool = False

    def _admin(self) -> Any:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(self.admin_url).set(drivername="postgresql")
        return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5)

    @property
    def url(self) -> str:
        from sqlalchemy.engine import make_url

        url = make_url(self.admin_url).set(drivername="postgresql", database=self.name)
        return url.render_as_string(hide_password=False)

    def create(self) -> None:
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))
        self.created = True

    def drop(self) -> None:
        if not self.created:
            return
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))
        self.created = False

    def server_version(self) -> str:
        with self._admin() as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def seed(database_url: str, upstream: str) -> str:
    """Migrate, then a user, an API key and one Ready replica of MODEL at `upstream`. Returns the key."""
    from lmstack.api.services.keys import create_key
    from lmstack.api.services.users import create_user
    from lmstack.config import Settings
    from lmstack.state import Deployment, Replica, open_database

    database = open_database(Settings(database_url=database_url))
    try:
        spec = {"backend": "vllm", "model": f"bench/{MODEL}", "servedName": MODEL, "replicas": 1,
                "resources": {"gpus": 0}, "args": []}
        with database.session() as session:
            create_user(session, name="bench", password=secrets.token_urlsafe(24), role="viewer")
            key = create_key(session, user="bench", name="gateway-overhead").token
            session.add(Deployment(name=MODEL, served_name=MODEL, spec=spec, spec_hash="bench"))
            session.add(Replica(deployment_name=MODEL, ordinal=0, worker_name="bench-worker", endpoint=upstream,
                                spec=spec, spec_hash="bench", status="ready"))
        return key
    finally:
        database.close()


# -- targets -------------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str  # direct | floor | lmstack | litellm
    port: int
    key: str
    proc: subprocess.Popen[bytes]  # whose CPU is counted (the upstream for direct)
    path: str = "/v1/chat/completions"


LMSTACK_PROFILED = """
import cProfile, signal, sys
profile, out = cProfile.Profile(), sys.argv[1]
def on(*_):
    profile.enable()
def off(*_):
    profile.disable()
    profile.dump_stats(out)
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
sys.argv = ["lmstack", *sys.argv[2:]]
from lmstack.cli.main import run
run()
"""


def start_lmstack(procs: Procs, *, port: int, database_url: str, log: Path, profile_out: Path | None = None,
                  workers: int = 1) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMSTACK_")}
    env.update({"LMSTACK_DATABASE_URL": database_url, "LMSTACK_JWT_SECRET": secrets.token_hex(32),
                "PYTHONUNBUFFERED": "1"})
    serve = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if profile_out is None:  # exactly `lmstack serve`
        argv = [sys.executable, "-c", "import sys; sys.argv[0] = 'lmstack'; from lmstack.cli.main import run; run()",
                *serve]
    else:
        argv = [sys.executable, "-c", LMSTACK_PROFILED, str(profile_out), *serve]
    return procs.start("lmstack", argv, log=log, env=env)


def _lmstack_name(workers: int) -> str:
    """A row's target: `lmstack` for one process, `lmstackN` for `lmstack serve --workers N`."""
    return "lmstack" if workers == 1 else f"lmstack{workers}"


def _listening(pid: int) -> int:
    """How many children of `pid` listen on a TCP port (the server processes of `lmstack serve --workers`)."""
    return sum(any(c.status == psutil.CONN_LISTEN for c in child.net_connections("tcp"))
               for child in psutil.Process(pid).children())


def litellm_available(python: str) -> str | None:
    """LiteLLM's version when `python` can import its proxy; None otherwise."""
    try:
        out = subprocess.run([python, "-c", "import importlib.metadata as m, litellm.proxy.proxy_server; "
                                            "print(m.version('litellm'))"],
                             capture_output=True, text=True, timeout=120, check=False,
                             env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def start_litellm(procs: Procs, python: str, *, port: int, upstream: str, key: str, workdir: Path,
                  log: Path) -> subprocess.Popen[bytes]:
    config = workdir / "litellm.yaml"
    # JSON is YAML: no YAML writer needed here.
    config.write_text(json.dumps({
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": f"{upstream}/v1", "api_key": "none"}}],
        "general_settings": {"master_key": key},
    }, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "DATABASE_URL", "OPENAI"))}
    env.update({"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "PYTHONUNBUFFERED": "1",
                "LITELLM_TELEMETRY": "False"})
    cli = Path(python).parent / "litellm"
    argv = ([str(cli)] if cli.exists() else [python, "-m", "litellm.proxy.proxy_cli"])
    argv += ["--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return procs.start("litellm", argv, log=log, env=env)


# -- rows ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    mode: str  # plain | stream
    concurrency: int
    target: str
    rps: float
    latency_us: list[int]
    first_us: list[int]
    errors: dict[str, int]  # the whole row, warm-up included
    window_errors: int  # in the measured window
    cpu_us_per_req: float | None
    load1: float
    warmup_s: float
    max_gap_s: float  # longest time in the window without an answer ending
    timeline: list[int]  # answers ending per half second from the start, warm-up included

    def pct(self, which: str, q: float) -> float:
        values = self.latency_us if which == "total" else self.first_us
        return percentile(values, q) / 1000.0  # ms


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))  # nearest rank
    return float(ordered[rank])


def run_row(procs: Procs, target: Target, *, mode: str, concurrency: int, warmup_s: float, duration_s: float,
            workdir: Path, on_measuring: Any = None) -> Row:
    out = workdir / f"loadgen-{secrets.token_hex(6)}.json"
    spec = {"host": "127.0.0.1", "port": target.port, "path": target.path, "key": target.key, "model": MODEL,
            "stream": mode == "stream", "concurrency": concurrency, "warmup_s": warmup_s,
            "duration_s": duration_s, "pid": target.proc.pid, "out": str(out)}
    load1 = os.getloadavg()[0]
    proc = procs.start("loadgen", [sys.executable, str(Path(__file__).resolve()), "--role", "loadgen",
                                   "--spec", json.dumps(spec)])
    try:
        if on_measuring is not None:
            mark = Path(str(out) + ".measuring")
            wait_until("the load generator's measured window", mark.exists, proc, None,
                       timeout=warmup_s + MAX_EXTRA_WARMUP_S + 30)
            on_measuring()
        proc.wait(timeout=warmup_s + MAX_EXTRA_WARMUP_S + duration_s + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"the load generator failed ({proc.returncode}) on {target.name} {mode} "
                               f"c={concurrency}")
        result = json.loads(out.read_text())
    finally:
        procs.stop(proc)
        out.unlink(missing_ok=True)
        Path(str(out) + ".measuring").unlink(missing_ok=True)
    count = len(result["latency_us"])
    return Row(mode=mode, concurrency=concurrency, target=target.name, rps=count / result["window_s"],
               latency_us=result["latency_us"], first_us=result["first_us"], errors=result["errors"],
               window_errors=result["window_errors"],
               cpu_us_per_req=result["cpu_s"] / count * 1e6 if count else None, load1=load1,
               warmup_s=result["warmup_s"], max_gap_s=result["max_gap_s"], timeline=result["timeline"])


# -- the table -----------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


def signed(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:+.2f}"


def print_tables(rows: list[Row], targets: list[str]) -> list[str]:
    """Prints the two tables; returns the target verdict lines."""
    by = {(r.mode, r.concurrency, r.target): r for r in rows}
    verdicts: list[str] = []
    for mode in ("plain", "stream"):
        mode_rows = [r for r in rows if r.mode == mode]
        if not mode_rows:
            continue
        if mode == "plain":
            print("\nNon-streaming POST /v1/chat/completions (latency = whole answer; ms)")
            head = (f"{'conc':>4}  {'target':<8} {'req/s':>8} {'%direct':>7} {'p50':>7} {'p99':>7} {'+p50':>7} "
                    f"{'+p99':>7} {'cpu/req':>8} {'load1':>5} {'errors':>6}  targets")
        else:
            print("\nStreaming POST /v1/chat/completions, stream=true (TTFB = first body chunk; total = [DONE]; ms)")
            head = (f"{'conc':>4}  {'target':<8} {'req/s':>8} {'%direct':>7} {'ttfb50':>7} {'ttfb99':>7} "
                    f"{'+ttfb50':>7} {'+ttfb99':>7} {'tot50':>7} {'tot99':>7} {'+tot50':>7} {'+tot99':>7} "
                    f"{'cpu/req':>8} {'load1':>5} {'errors':>6}  targets")
        print(head)
        print("-" * len(head))
        for conc in sorted({r.concurrency for r in mode_rows}):
            direct = by.get((mode, conc, "direct"))
            for name in targets:
                row = by.get((mode, conc, name))
                if row is None:
                    continue
                share = row.rps / direct.rps * 100 if direct and direct.rps else None
                notes = []
                if name.startswith("lmstack"):
                    notes = _targets_for(row, direct, by.get((mode, conc, "litellm")), by.get((mode, conc, "floor")))
                    verdicts += [f"{mode:<6} c={conc:<3} {name:<8} {note}" for note in notes if "floor" not in note]
                cpu = f"{row.cpu_us_per_req:.0f}us" if row.cpu_us_per_req is not None else "-"
                errors = sum(row.errors.values())
                line = f"{conc:>4}  {name:<8} {row.rps:>8.0f} {fmt(share, 1):>7} "
                if mode == "plain":
                    line += (f"{fmt(row.pct('total', 50)):>7} {fmt(row.pct('total', 99)):>7} "
                             f"{_added(row, direct, 'total', 50):>7} {_added(row, direct, 'total', 99):>7} ")
                else:
                    line += (f"{fmt(row.pct('first', 50)):>7} {fmt(row.pct('first', 99)):>7} "
                             f"{_added(row, direct, 'first', 50):>7} {_added(row, direct, 'first', 99):>7} "
                             f"{fmt(row.pct('total', 50)):>7} {fmt(row.pct('total', 99)):>7} "
                             f"{_added(row, direct, 'total', 50):>7} {_added(row, direct, 'total', 99):>7} ")
                line += f"{cpu:>8} {row.load1:>5.2f} {errors:>6}  {'; '.join(notes)}"
                print(line.rstrip())
        for row in mode_rows:
            if row.errors:
                print(f"  errors in {row.target} c={row.concurrency} ({row.window_errors} in the measured window; "
                      f"all: {row.errors})")
    return verdicts


def _added(row: Row, direct: Row | None, which: str, q: float) -> str:
    if direct is None or row is direct:
        return ""
    return signed(row.pct(which, q) - direct.pct(which, q))


def _targets_for(row: Row, direct: Row | None, litellm: Row | None, floor: Row | None) -> list[str]:
    notes = []
    if floor is not None and floor.rps:
        notes.append(f"{row.rps / floor.rps:.0%} of the floor's req/s")
    if row.concurrency == 1 and direct is not None:
        added = row.pct("total", 50) - direct.pct("total", 50)
        notes.append(f"+p50 {added:.2f}ms vs <{TARGET_ADDED_P50_MS:g}ms: {'MET' if added < 1 else 'MISSED'}")
    if row.concurrency == 256 and direct is not None and direct.rps:
        share = row.rps / direct.rps
        notes.append(f"req/s {share:.0%} of direct vs >={TARGET_THROUGHPUT:.0%}: "
                     f"{'MET' if share >= TARGET_THROUGHPUT else 'MISSED'}")
    if litellm is not None:
        which = "first" if row.mode == "stream" else "total"
        mine, theirs = row.pct(which, 50), litellm.pct(which, 50)
        ahead = row.rps > litellm.rps and (theirs != theirs or mine < theirs)  # NaN: LiteLLM answered none
        ratio = f"x{row.rps / litellm.rps:.2f}" if litellm.rps else "(LiteLLM: none in the window)"
        notes.append(f"vs LiteLLM {ratio} req/s, p50 {fmt(mine)} vs {fmt(theirs)}ms: "
                     f"{'ahead' if ahead else 'BEHIND'}")
    return notes


# -- profiling -----------------------------------------------------------------------------------------------

_BUCKETS = [  # (label, substring of the file path); first match wins
    ("lmstack", "/lmstack/"), ("aiohttp", "/aiohttp/"), ("yarl", "/yarl/"), ("multidict", "/multidict/"),
    ("fastapi", "/fastapi/"), ("starlette", "/starlette/"), ("pydantic", "/pydantic"),
    ("uvicorn", "/uvicorn/"), ("anyio", "/anyio/"), ("sniffio", "/sniffio/"), ("uvloop", "uvloop"),
    ("httptools", "httptools"), ("logging", "/logging/"), ("asyncio", "/asyncio/"), ("json", "/json/"),
    ("sqlalchemy", "/sqlalchemy/"), ("typing", "/typing.py"),
]


def _bucket(filename: str) -> str:
    for label, needle in _BUCKETS:
        if needle in filename:
            return label
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins/C"
    return "other: " + Path(filename).name


def report_cprofile(path: Path, top: int) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values()) or 1.0
    by_bucket: Counter[str] = Counter()
    for (filename, _, _), (_, _, tottime, _, _) in raw.items():
        by_bucket[_bucket(filename)] += tottime
    print(f"  own time by package (cProfile tottime, {total:.2f}s on the event-loop thread):")
    for label, seconds in by_bucket.most_common(12):
        print(f"    {seconds / total:6.1%}  {label}")
    print(f"  top {top} functions by own time:")
    ranked = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (filename, line, func), (_, calls, tottime, cumtime, _) in ranked:
        short = "/".join(Path(filename).parts[-2:]) if filename.startswith("/") else filename
        print(f"    {tottime / total:6.1%} own {cumtime / total:6.1%} cum {calls:>8} calls  {func} ({short}:{line})")
    interesting = ("lmstack/", "starlette/", "fastapi/", "aiohttp/", "uvicorn/", "logging/")
    print(f"  top {top} functions by cumulative time (lmstack, FastAPI/Starlette, aiohttp, uvicorn, logging):")
    ranked = sorted(((k, v) for k, v in raw.items() if any(i in k[0] for i in interesting)),
                    key=lambda item: item[1][3], reverse=True)[:top]
    for (filename, line, func), (_, calls, tottime, cumtime, _) in ranked:
        short = "/".join(Path(filename).parts[-2:])
        print(f"    {cumtime / total:6.1%} cum {tottime / total:6.1%} own {calls:>8} calls  {func} ({short}:{line})")


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def report_pyspy(path: Path, top: int) -> None:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_bucket: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        names = []
        for frame in frames:
            match = _FRAME.match(frame)
            func, filename = (match.group("func"), match.group("file")) if match else (frame, "")
            names.append((f"{func} ({'/'.join(Path(filename).parts[-2:])})", filename))
        leaf_name, leaf_file = names[-1]
        own[leaf_name] += count
        by_bucket[_bucket(leaf_file)] += count
        for name in {n for n, _ in names}:
            inclusive[name] += count
    if not total:
        print("  py-spy recorded no samples")
        return
    print(f"  own time by package (py-spy, {total} samples of active threads):")
    for label, count in by_bucket.most_common(12):
        print(f"    {count / total:6.1%}  {label}")
    print(f"  top {top} functions by own time:")
    for name, count in own.most_common(top):
        print(f"    {count / total:6.1%}  {name}")
    print(f"  top {top} functions by inclusive time (lmstack, FastAPI/Starlette, aiohttp, uvicorn, logging):")
    interesting = ("lmstack/", "starlette/", "fastapi/", "aiohttp/", "uvicorn/", "logging/")
    ranked = [(n, c) for n, c in inclusive.most_common() if any(i in n for i in interesting)][:top]
    for name, count in ranked:
        print(f"    {count / total:6.1%}  {name}")


def profile_phase(procs: Procs, args: argparse.Namespace, *, database_url: str, key: str, workdir: Path,
                  tool: str) -> None:
    py_spy = args.py_spy or shutil.which("py-spy")
    if not py_spy:
        if tool == "py-spy":
            print("\nprofile: py-spy not found (install it, e.g. `pip install py-spy`, or give --py-spy); "
                  "using cProfile")
        tool, py_spy = "cprofile", ""
    loads = [(mode, int(conc)) for mode, conc in (item.split(":") for item in args.profile_load.split(","))]
    for mode, conc in loads:
        out = workdir / f"profile-{mode}-{conc}.{'prof' if tool == 'cprofile' else 'txt'}"
        port = free_port()
        log = workdir / f"lmstack-profile-{mode}-{conc}.log"
        gateway = start_lmstack(procs, port=port, database_url=database_url, log=log,
                                profile_out=out if tool == "cprofile" else None)
        wait_until("lmstack serve (profiled)", lambda p=port: MODEL.encode() in http_get(
            f"http://127.0.0.1:{p}/v1/models", key)[1], gateway, log)
        target = Target("lmstack", port, key, gateway)
        spy: list[subprocess.Popen[bytes]] = []

        def measuring(gw: Any = gateway, spy: Any = spy, out: Path = out) -> None:
            if tool == "cprofile":
                os.kill(gw.pid, signal.SIGUSR1)
            else:
                spy.append(procs.start("py-spy", [py_spy, "record", "--pid", str(gw.pid), "--rate", "500",
                                                  "--duration", str(max(1, int(args.duration))), "--format", "raw",
                                                  "--nonblocking", "--output", str(out)],
                                       log=workdir / "py-spy.log"))

        row = run_row(procs, target, mode=mode, concurrency=conc, warmup_s=args.warmup, duration_s=args.duration,
                      workdir=workdir, on_measuring=measuring)
        if tool == "cprofile":
            os.kill(gateway.pid, signal.SIGUSR2)
            wait_until("the profile", out.exists, None, None, timeout=30)
            time.sleep(0.5)  # let the dump finish
        else:
            for s in spy:
                s.wait(60)
        procs.stop(gateway)
        print(f"\nProfile of lmstack serve, {mode} c={conc} ({tool}; {row.rps:.0f} req/s while profiled, "
              f"p50 {row.pct('total', 50):.2f}ms; figures under a profiler are not the table's): {out}")
        if not out.exists():
            print("  no profile was written (see " + str(workdir / "py-spy.log") + ")")
        elif tool == "cprofile":
            report_cprofile(out, args.profile_top)
        else:
            report_pyspy(out, args.profile_top)


# -- main ----------------------------------------------------------------------------------------------------


def environment_notes(admin: ThrowawayDatabase, litellm_version: str | None) -> list[str]:
    import fastapi
    import httptools
    import starlette
    import uvicorn

    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        pg = admin.server_version()
    except Exception as exc:  # only a note
        pg = f"? ({type(exc).__name__})"
    return [
        f"machine: {os.cpu_count()} CPUs ({cpu_model}), {platform.system()} {platform.release()}; "
        f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(other work on this machine shares these CPUs with all four processes)",
        f"python {platform.python_version()}; lmstack serve: uvicorn {uvicorn.__version__} (uvloop + httptools "
        f"when installed), FastAPI {fastapi.__version__}, Starlette {starlette.__version__}, its own client to the "
        f"upstream (httptools {httptools.__version__}); PostgreSQL {pg}",
        "lmstack serve runs with its default settings (no access log, registry refresh 1 s, usage flush 1 s, key "
        "cache 1 s, keys in use re-checked in the background); the API key is verified from its cache",
        f"LiteLLM: {litellm_version or 'not run'}" + (" (its CLI defaults, 1 worker, no database, master key)"
                                                      if litellm_version else ""),
    ]


def print_litellm_method(rows: list[Row]) -> None:
    """The figures in the form of LiteLLM's published cross-gateway comparison, beside its published numbers."""
    direct = {row.concurrency: row for row in rows if row.target == "direct"}
    print("\nLiteLLM's method (upstream answering in 22 ms; added = through minus direct, same concurrency):")
    print(f"  {'target':<9}{'c':>4}{'+p50 ms':>10}{'+p99 ms':>10}   goal (lmstack)")
    for row in rows:
        base = direct.get(row.concurrency)
        if row.target == "direct" or base is None:
            continue
        goal = {1: "p99 added < 1 ms", 64: "p99 added < 5 ms"}.get(row.concurrency, "")
        added50 = row.pct("total", 50) - base.pct("total", 50)
        added99 = row.pct("total", 99) - base.pct("total", 99)
        print(f"  {row.target:<9}{row.concurrency:>4}{added50:>10.2f}{added99:>10.2f}   "
              + (goal if row.target.startswith("lmstack") else ""))
    print("  published (their machines): Go/Rust gateways 0.75-0.9 ms at c=1, 29-40 ms at c=64 (p99 added); "
          "LiteLLM's Python proxy 546 ms at c=64")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["bench", "upstream", "loadgen", "floor"], default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="lmstack rows for `lmstack serve --workers N`, one per N (default: 1 2; the rows are "
                             "named lmstack and lmstackN)")
    parser.add_argument("--modes", nargs="+", choices=["plain", "stream"], default=["plain", "stream"])
    parser.add_argument("--targets", nargs="+", choices=["direct", "floor", "lmstack", "litellm"],
                        default=["direct", "floor", "lmstack", "litellm"],
                        help="floor: a bare uvicorn pass-through with lmstack's upstream client, the most this "
                        "stack allows")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds per row not measured (default 1)")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per row (default 3)")
    parser.add_argument("--token-delay-ms", type=float, default=0.0,
                        help="the upstream's time per chunk: between stream chunks, and (times the chunks) "
                             "before a whole answer; default 0: pure overhead. 20 is an engine decoding 50 "
                             "tokens/s a stream"),
    parser.add_argument("--answer-delay-ms", type=float, default=0.0,
                        help="the upstream's time before it answers (whole or stream), as a fixed delay")
    parser.add_argument("--method", choices=["ours", "litellm"], default="ours",
                        help="litellm: the method of LiteLLM's published cross-gateway benchmark: an upstream that "
                             "answers in 22 ms, concurrency 1, 16 and 64, whole answers, p50 and p99 added "
                             "(overrides --concurrency, --modes and --answer-delay-ms)")
    parser.add_argument("--litellm-python", metavar="PATH",
                        help="a Python that can import litellm[proxy]: adds LiteLLM rows")
    parser.add_argument("--profile", choices=["cprofile", "py-spy"],
                        default=os.environ.get("LMSTACK_BENCH_PROFILE") or None,
                        help="after the table, profile the gateway under load (env LMSTACK_BENCH_PROFILE)")
    parser.add_argument("--profile-load", default="plain:1,plain:256", help="MODE:CONCURRENCY,... to profile")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--py-spy", metavar="PATH", help="py-spy executable (default: from PATH)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, profiles)")
    args = parser.parse_args()
    if args.method == "litellm":
        args.concurrency, args.modes, args.answer_delay_ms = LITELLM_METHOD_CONCURRENCY, ["plain"], 22.0

    if args.role == "upstream":
        run_upstream(args.port, MODEL, args.token_delay_ms, args.answer_delay_ms)
        return 0
    if args.role == "loadgen":
        run_loadgen(json.loads(args.spec))
        return 0
    if args.role == "floor":
        run_floor(args.port, args.upstream_port)
        return 0

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)  # also when started with SIGINT ignored (a background job)
    procs = Procs()
    database = ThrowawayDatabase(os.environ.get("LMSTACK_TEST_POSTGRES", DEFAULT_ADMIN_URL))
    workdir = Path(tempfile.mkdtemp(prefix="lmstack-gateway-bench-"))
    started = time.monotonic()
    try:
        litellm_version = None
        if "litellm" in args.targets:
            if args.litellm_python:
                litellm_version = litellm_available(args.litellm_python)
                if litellm_version is None:
                    print(f"note: {args.litellm_python} cannot import litellm.proxy: no LiteLLM rows. Create one "
                          "with: python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'")
            else:
                print("note: no LiteLLM rows. To add them, create a separate venv and pass its Python:\n"
                      "  python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'\n"
                      "  .venv/bin/python bench/gateway_overhead.py --litellm-python /tmp/litellm/bin/python")
        try:
            database.create()
        except Exception as exc:
            print(f"error: cannot create a database on {database.admin_url} ({' '.join(str(exc).split())}); start "
                  "PostgreSQL (trust auth, user postgres) on 127.0.0.1:5432 or set LMSTACK_TEST_POSTGRES",
                  file=sys.stderr)
            return 1

        # The upstream stand-in.
        up_port = free_port()
        up_log = workdir / "upstream.log"
        upstream_proc = procs.start("upstream", [sys.executable, str(Path(__file__).resolve()), "--role",
                                                 "upstream", "--port", str(up_port), "--token-delay-ms",
                                                 str(args.token_delay_ms), "--answer-delay-ms",
                                                 str(args.answer_delay_ms)], log=up_log)
        upstream = f"http://127.0.0.1:{up_port}"
        wait_until("the upstream stand-in", lambda: http_get(f"{upstream}/health")[0] == 200, upstream_proc, up_log)
        targets: list[Target] = []
        if "direct" in args.targets:
            targets.append(Target("direct", up_port, "none", upstream_proc))

        if "floor" in args.targets:
            floor_port = free_port()
            floor_log = workdir / "floor.log"
            floor = procs.start("floor", [sys.executable, str(Path(__file__).resolve()), "--role", "floor", "--port",
                                          str(floor_port), "--upstream-port", str(up_port)], log=floor_log)
            wait_until("the floor pass-through", lambda: http_get(f"http://127.0.0.1:{floor_port}/health")[0] == 200,
                       floor, floor_log)
            targets.append(Target("floor", floor_port, "none", floor))

        key = seed(database.url, upstream)
        for workers in args.workers if "lmstack" in args.targets else []:
            gw_port = free_port()
            gw_log = workdir / f"lmstack{workers}.log"
            gateway = start_lmstack(procs, port=gw_port, database_url=database.url, log=gw_log, workers=workers)
            wait_until(f"lmstack serve --workers {workers}", lambda p=gw_port: MODEL.encode() in http_get(
                f"http://127.0.0.1:{p}/v1/models", key)[1], gateway, gw_log)
            if workers > 1:  # every process up, not just the first: a connection may land on any of them
                wait_until(f"{workers} server processes", lambda p=gateway.pid, n=workers: _listening(p) >= n,
                           gateway, gw_log)
            targets.append(Target(_lmstack_name(workers), gw_port, key, gateway))

        if litellm_version:
            ll_port = free_port()
            ll_log = workdir / "litellm.log"
            master = "sk-bench-" + secrets.token_hex(12)
            litellm = start_litellm(procs, args.litellm_python, port=ll_port, upstream=upstream, key=master,
                                    workdir=workdir, log=ll_log)
            wait_until("LiteLLM", lambda: http_get(f"http://127.0.0.1:{ll_port}/health/liveliness")[0] == 200,
                       litellm, ll_log, timeout=180)
            targets.append(Target("litellm", ll_port, master, litellm))

        for target in targets:  # one answer each way before measuring anything
            for stream in (False, True):
                status, body = chat_once(target.port, target.path, target.key, stream=stream)
                ok = status == 200 and (body.rstrip().endswith(b"[DONE]") if stream else b'"choices"' in body)
                if not ok:
                    raise RuntimeError(f"{target.name} (stream={stream}) answered {status}: {body[:300]!r}")

        notes = environment_notes(database, litellm_version)
        print("Environment:")
        for note in notes:
            print("  " + note)
        print(f"  upstream stand-in: bare ASGI app under uvicorn (uvloop, httptools, no access log), one process; "
              f"stream = {len(PIECES) + 2} chunks + [DONE], token delay {args.token_delay_ms:g} ms"
              + (f" (a whole answer after {len(PIECES) + 2} of them)" if args.token_delay_ms else "")
              + (f"; every answer starts after {args.answer_delay_ms:g} ms" if args.answer_delay_ms else ""))
        print(f"  rows: >= {args.warmup:g} s warm-up (until every client has had an answer, at most "
              f"{MAX_EXTRA_WARMUP_S:g} s more) + {args.duration:g} s measured (answers ending in it count); closed "
              "loop, one keep-alive connection per client; load generator: asyncio/uvloop + httptools, its own "
              "process")
        names = [t.name for t in targets]
        rows: list[Row] = []
        for mode in args.modes:
            for conc in args.concurrency:
                for target in targets:
                    row = run_row(procs, target, mode=mode, concurrency=conc, warmup_s=args.warmup,
                                  duration_s=args.duration, workdir=workdir)
                    rows.append(row)
                    print(f"  ran {mode:<6} c={conc:<3} {target.name:<8} {row.rps:8.0f} req/s  "
                          f"p50 {row.pct('total', 50):8.2f} ms  load1 {row.load1:.2f}  warm-up {row.warmup_s:.1f} s  "
                          f"longest gap {row.max_gap_s * 1000:.0f} ms", flush=True)
                    if row.max_gap_s > 0.5:
                        print(f"    answers per 0.5 s: {row.timeline}", flush=True)

        verdicts = print_tables(rows, names)
        print("\ncpu/req: CPU time of the proxy's processes (direct rows: the upstream's) in the measured window, per "
              "answer counted in it. load1: load average when the row started.")
        print("+p50/+p99: through the proxy minus direct, same mode and concurrency (difference of percentiles).")
        print(f"Load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"wall time {time.monotonic() - started:.0f} s")
        if verdicts:
            print("\nTargets for lmstack (added p50 < 1 ms at c=1; req/s at c=256 >= 90% of direct; ahead of LiteLLM "
                  "= more req/s and lower p50 (streams: TTFB p50)):")
            for line in verdicts:
                print("  " + line)
        if args.method == "litellm":
            print_litellm_method(rows)
        if args.profile and "lmstack" in args.targets:
            profile_phase(procs, args, database_url=database.url, key=key, workdir=workdir, tool=args.profile)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping processes and dropping the database", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop_all()
        try:
            database.drop()
        except Exception as exc:
            print(f"warning: could not drop database {database.name}: {exc}", file=sys.stderr)
        if args.keep or args.profile:
            print(f"logs{' and profiles' if args.profile else ''}: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
