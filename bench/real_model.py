"""What lmstack's gateway costs a real model: tokens/s and time to first token (TTFT) of streamed chat
completions, direct to a llama.cpp replica vs through `lmstack serve`, at 1 and 4 concurrent streams.

    .venv/bin/python bench/real_model.py                       # as root, like the test bed
    .venv/bin/python bench/real_model.py --runs 9 --max-tokens 128 --concurrency 1 2 4

Brings up everything itself and removes it at the end (also on Ctrl-C or SIGTERM):
  - a multi-host test bed (tests/testbed) of its own, under names that do not clash with the tests' bed
    (prefix lmsrmb, bridge lmsrmbbr0, subnet 10.215.0.0/24, /var/tmp/lmstack-realmodel-bench), so it runs
    beside a test session instead of waiting for its lock;
  - llama.cpp's llama-server and SmolLM2-135M-Instruct from the test assets (scripts/prepare_test_assets.sh,
    env LMSTACK_TEST_ASSETS), the image loaded on the bed's host and the model in its model cache;
  - a throwaway PostgreSQL database (admin URL: LMSTACK_TEST_POSTGRES, default postgres@127.0.0.1:5432),
    dropped at the end;
  - a commit with a `llamacpp` deployment applied with `apply_source` (as `lmstack apply` does): ONE replica,
    so that "through the gateway" and "direct" reach the same engine (with two, the gateway would spread 4
    streams over two engines and beat "direct" for reasons that are not the gateway's);
  - the gateway: exactly `lmstack serve` in its own process, on that database (a user and an API key).

Measured, for C streams (the same prompt, greedy, `ignore_eos`, exactly the asked number of tokens each,
`stream_options.include_usage`), from threads of this process with the same plain HTTP client for both
targets; direct and the gateway alternate (which goes first alternates too), after a warm-up of each:

- tokens/s, from runs that start C streams of --max-tokens tokens at once: the run's aggregate decoding
  rate while all C streams decode, the chunks from the last stream's first token to the first stream's last
  over that time (so TTFT is not in it, nor the steps where only some streams run). Medians of --runs runs;
  the ratio is the median of each gateway run's rate over the direct run beside it.
- TTFT (time to first token), from requests that arrive at random moments: each of the C streams sends
  --ttft-requests short requests (--ttft-tokens tokens) one after another on a kept-alive connection (as an
  SDK does), each after a random pause of up to --pause-ms. TTFT is from sending a request to the first chunk
  with content. With other streams decoding, the engine starts a new request with its next batch step, so a
  request waits for the step in progress to end: anything from nothing to a whole step (~35 ms at 4 streams
  here), most of the spread. At random arrival times that wait averages the same for both targets.
- The engine's container gets the last CPU to itself, and this process and the gateway the others, as when
  the engine runs on a worker and the gateway on a host of its own (--shared-cpus: all share every CPU; on
  2 CPUs the gateway's relaying, ~150 us of CPU a token, then slows a CPU-bound engine by 1-3% at 4 streams).
- Where this runs as root, the bed's bridge is watched with a packet socket (WireTimes): each request's
  arrival at the engine and its first token leaving it, by kernel timestamps. A client TTFT then splits into
  the path (client -> engine -> client, through the gateway or not), the wait for the step in progress, and
  the step that made the first token. "Added TTFT" is the path's difference plus the step's, with its 95%
  confidence interval; the wait, which only says when requests happened to arrive, is printed beside it and
  averages out. Without the packet socket it is the difference of the mean client TTFTs (wider interval).
- The same TTFT when C streams start at the same instant (the tokens/s runs): printed apart, because it is
  mostly about batching. The engine takes what has arrived when its next step begins; a request a fraction
  of a millisecond too late waits a whole step. The gateway passes the C requests on one after another, so
  they straddle a step more often than direct ones do; the medians jump by a step from run to run, direct
  too.

The engine caches the prompt, so TTFT is mostly decoding steps.

The API key is verified from the gateway's key cache (LMSTACK_KEY_CACHE_S, 1 s by default), which re-checks
keys in use in the background, so even a run that starts seconds after the last one finds its key verified
and pays no database lookup; --key-cache-s changes the cache time.

Figures only, no assertions; the targets are printed beside them: through the gateway >= 98% of direct
tokens/s, and < 2 ms added to the first token (difference of the mean TTFTs at random arrival times).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import http.client
import itertools
import json
import math
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the test bed (tests/testbed)

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MODEL = "smollm2"
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
TARGET_RATIO = 0.98  # gateway tokens/s over direct
TARGET_ADDED_TTFT_MS = 2.0
TTFT_ROUND = 4  # requests per stream before switching between direct and the gateway
STEP_GAP_S = 0.005  # tokens this much before a first token belong to an earlier batch step (steps take ~10+ ms)
_ETH_P_ALL = 0x0003
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # SCM_TIMESTAMPNS has the same number


# -- the client ------------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    ttft_s: float  # from sending the request to the first chunk with content
    tag: str  # the request's `user` field: how WireTimes finds it
    sent_at: float  # wall-clock time (time.time()) it was sent, for comparing with WireTimes
    chunks_at: list[float]  # time.monotonic() of each chunk with content


_tags = itertools.count()


def one_stream(base: str, key: str | None, max_tokens: int, start_at: float,
               kept: http.client.HTTPConnection | None = None) -> StreamResult:
    """One streamed request, sent at `start_at`; on `kept` (a kept-alive connection, left open) or a new one."""
    host, port = base.removeprefix("http://").split(":")
    tag = f"bench-{os.getpid()}-{next(_tags)}"  # OpenAI's `user` field: engines and the gateway pass it on
    body = json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "user": tag})
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    connection = kept or http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        if connection.sock is None:
            connection.connect()
        while time.monotonic() < start_at:  # all C streams leave together
            time.sleep(0.0005)
        started, sent_at = time.monotonic(), time.time()
        # A kept connection the engine has closed is replaced, as a pooled client does (urllib3, httpx): on the
        # clock, since a client pays for it. llama.cpp's server closes the connection after every stream.
        if kept is not None and _closed_by_peer(connection):
            connection.close()
            connection.connect()
        connection.request("POST", "/v1/chat/completions", body, headers)
        answer = connection.getresponse()
        if answer.status != 200:
            raise RuntimeError(f"{base} answered {answer.status}: {answer.read()[:300]!r}")
        tokens = 0
        chunks_at: list[float] = []
        for raw in answer:
            if not raw.startswith(b"data: {"):
                continue
            chunk = json.loads(raw[6:])
            if chunk.get("error"):
                raise RuntimeError(f"{base}: error in the stream: {chunk['error']}")
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if any((choice.get("delta") or {}).get("content") for choice in chunk.get("choices", [])):
                chunks_at.append(time.monotonic())
        if not chunks_at or tokens == 0:
            raise RuntimeError(f"{base}: a stream without content or usage")
        return StreamResult(chunks_at[0] - started, tag, sent_at, chunks_at)
    finally:
        if kept is None:
            connection.close()


def _closed_by_peer(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle connection has something to read: its end, since no answer is due."""
    return connection.sock is None or bool(select.select([connection.sock], [], [], 0)[0])


@dataclass
class Run:
    tokens_per_s: float  # the run's aggregate rate while all its streams decode
    ttfts_ms: list[float]
    gateway_cpu_ms: float | None = None  # CPU time the gateway process used during the run
    wall_s: float = 0.0  # the run's duration


def cpu_s(pid: int) -> float:
    """User + system CPU seconds `pid` has used (its threads included), from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(base: str, key: str | None, concurrency: int, max_tokens: int, cpu_of: int | None = None) -> Run:
    results: list[StreamResult | BaseException] = []
    lock = threading.Lock()
    start_at = time.monotonic() + 0.05

    def worker() -> None:
        try:
            result: StreamResult | BaseException = one_stream(base, key, max_tokens, start_at)
        except BaseException as exc:  # reported below
            result = exc
        with lock:
            results.append(result)

    cpu_before = cpu_s(cpu_of) if cpu_of else 0.0
    began = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.monotonic() - began
    cpu_ms = (cpu_s(cpu_of) - cpu_before) * 1000 if cpu_of else None
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise RuntimeError(f"{len(failures)} of {concurrency} streams failed: {failures[0]}")
    done = [r for r in results if isinstance(r, StreamResult)]
    # The rate while all C streams decode: from the last stream's first token to the first stream's last one.
    # Before and after, fewer streams run, and whether the prompts made one batch step or two is the engine's
    # batching, not the gateway's.
    begin, end = max(r.chunks_at[0] for r in done), min(r.chunks_at[-1] for r in done)
    tokens = sum(1 for r in done for at in r.chunks_at if begin < at <= end)
    return Run(tokens / (end - begin), [r.ttft_s * 1000 for r in done], cpu_ms, wall_s)


def random_arrivals(base: str, key: str | None, concurrency: int, requests: int, max_tokens: int, pause_s: float,
                    seed: int) -> list[StreamResult]:
    """`concurrency` streams that each send `requests` requests one after another, each after a random pause of
    up to `pause_s` (from `seed`: the same pauses for both targets)."""
    ttfts: list[StreamResult] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def stream(index: int) -> None:
        pauses = random.Random(seed * 1000 + index)
        host, port = base.removeprefix("http://").split(":")
        # One kept-alive connection per stream, as an SDK keeps them: to the engine, or to the gateway.
        connection = http.client.HTTPConnection(host, int(port), timeout=300)
        try:
            for _ in range(requests):
                result = one_stream(base, key, max_tokens, time.monotonic() + pauses.uniform(0, pause_s), connection)
                with lock:
                    ttfts.append(result)
        except BaseException as exc:  # reported below
            with lock:
                failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} of {concurrency} streams to {base} failed: {failures[0]!r}")
    return ttfts


class WireTimes:
    """When each request reached the engine and when its first token left it, read off the test bed's bridge
    (a packet socket; kernel timestamps): the engine's own TTFT, whichever way the request came. The engine
    runs on the bed's host, so every byte to and from it crosses the bridge: from this process (direct) and
    from the gateway alike.

    With it a request's client TTFT splits into the engine's part and the path's part (client -> engine and
    back, through the gateway or not), and the engine's part into the wait for the batch step in progress
    (set by when the request happened to arrive) and the step that produced its first token."""

    _TAG = re.compile(rb'"user":\s*"([^"]+)"')
    _CONTENT = re.compile(rb'"content":\s*"[^"]')  # a delta with text (not the role chunk's null or "")

    def __init__(self, interface: str, engine: tuple[str, int]) -> None:
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        self._sock.bind((interface, 0))
        self._sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self._sock.settimeout(0.2)
        self._engine = (socket.inet_aton(engine[0]), engine[1])
        self._open: dict[tuple[bytes, int], list[Any]] = {}  # connection -> [arrived, tag, first token]
        self.requests: dict[str, tuple[float, float]] = {}  # tag -> (arrived, first token left), wall clock
        self.tokens: list[float] = []  # when each chunk with text left the engine (any stream), in order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame, ancillary, _, _ = self._sock.recvmsg(65536, 64)
            except TimeoutError:
                continue
            except OSError:
                return
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    seconds, nanoseconds = struct.unpack("qq", data[:16])
                    self._packet(frame, seconds + nanoseconds / 1e9)

    def _packet(self, frame: bytes, at: float) -> None:
        if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4, TCP
            return
        ip = frame[14:]
        tcp = ip[(ip[0] & 0x0F) * 4:struct.unpack("!H", ip[2:4])[0]]
        payload = tcp[(tcp[12] >> 4) * 4:]
        if not payload:
            return
        source_port, destination_port = struct.unpack("!HH", tcp[0:4])
        source, destination = (ip[12:16], source_port), (ip[16:20], destination_port)
        with self._lock:
            if destination == self._engine:
                if payload.startswith(b"POST "):
                    self._open[source] = [at, None, None]
                entry = self._open.get(source)
                if entry is not None and entry[1] is None:
                    found = self._TAG.search(payload)
                    if found:
                        entry[1] = found.group(1).decode()
            elif source == self._engine and self._CONTENT.search(payload):
                self.tokens.append(at)
                entry = self._open.get(destination)
                if entry is not None and entry[2] is None and entry[1] is not None:
                    entry[2] = at
                    self.requests[entry[1]] = (entry[0], at)

    def split(self, result: StreamResult) -> tuple[float, float, float] | None:
        """(path, wait, step) in ms for a request seen on the wire: client TTFT minus the engine's, the wait from
        its arrival to the end of the step in progress (0 if the engine was idle), and the rest of the engine's
        TTFT (the step that produced its first token). None if the wire did not see it."""
        with self._lock:
            seen = self.requests.get(result.tag)
            if seen is None:
                return None
            arrived, first = seen
            at = bisect.bisect_left(self.tokens, first - STEP_GAP_S)  # tokens of the step before the first one's
            before = self.tokens[at - 1] if at > 0 else None
        engine_s = first - arrived
        step_ended = before if before is not None and before > arrived else arrived
        return ((result.ttft_s - engine_s) * 1000, (step_ended - arrived) * 1000, (first - step_ended) * 1000)


# -- bringing things up ----------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything started, for the clean-up."""

    workdir: Path
    bed: Any = None
    admin_url: str = DEFAULT_ADMIN_URL
    database_name: str | None = None
    gateway: subprocess.Popen[bytes] | None = None
    bridge: str = "lmsrmbbr0"  # the bed's bridge (BedConfig below)
    wire: WireTimes | None = None
    notes: list[str] = field(default_factory=list)

    def database_url(self) -> str:
        from sqlalchemy.engine import make_url

        url = make_url(self.admin_url).set(drivername="postgresql", database=self.database_name)
        return url.render_as_string(hide_password=False)

    def _admin(self) -> Any:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(self.admin_url).set(drivername="postgresql")
        return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        from psycopg import sql

        name = f"lmstack_bench_{secrets.token_hex(4)}"
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.database_name = name
        return self.database_url()

    def pin(self) -> None:
        """The engine's container on the last CPU, this process and the gateway (all threads) on the others. In a
        fleet the engine runs on a worker and `lmstack serve` on a host of its own; on the bed they share this
        machine, and on 2 CPUs the gateway's relaying would take CPU from a CPU-bound engine, which is not what
        the targets are about (--shared-cpus measures that too)."""
        assert self.bed is not None and self.gateway is not None
        cpus = os.cpu_count() or 1
        if cpus < 2:
            raise RuntimeError("the engine needs a CPU of its own: 2 CPUs or more, or --shared-cpus")
        host = self.bed.hosts[0]
        containers = self.bed.docker(host, "ps", "-q", "--filter", f"label=lmstack.deployment={MODEL}").stdout.split()
        for container in containers:
            self.bed.docker(host, "update", "--cpuset-cpus", str(cpus - 1), container)
        others = f"0-{cpus - 2}"
        for pid in (os.getpid(), self.gateway.pid):
            subprocess.run(["taskset", "-a", "-p", "-c", others, str(pid)], check=True, capture_output=True)
        print(f"pinned: the engine ({len(containers)} container) on CPU {cpus - 1}, client and gateway on {others}",
              flush=True)

    def watch_wire(self, endpoint: str) -> WireTimes | None:
        """Packet times on the bed's bridge (root, Linux); None, with a note, where that cannot be had."""
        host, port = endpoint.removeprefix("http://").rsplit(":", 1)
        try:
            self.wire = WireTimes(self.bridge, (host, int(port)))
        except OSError as exc:
            print(f"note: no packet socket on {self.bridge} ({exc}): TTFT is not split", file=sys.stderr)
        return self.wire

    def clean_up(self) -> None:
        if self.wire is not None:
            self.wire.close()
        if self.gateway is not None and self.gateway.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.gateway.pid, signal.SIGTERM)
            try:
                self.gateway.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.gateway.pid, signal.SIGKILL)
                self.gateway.wait(10)
        if self.bed is not None:
            problems = self.bed.close()  # containers, daemons, namespaces, the model caches under its folder
            if problems:
                print("warning: the test bed was not removed completely: " + "; ".join(problems), file=sys.stderr)
        if self.database_name is not None:
            from psycopg import sql

            try:
                with self._admin() as conn:
                    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(self.database_name)))
            except Exception as exc:
                print(f"warning: could not drop database {self.database_name}: {exc}", file=sys.stderr)
        shutil.rmtree(self.workdir, ignore_errors=True)


def wait_until(what: str, ready: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None,
               log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})\n{tail}")
        with contextlib.suppress(OSError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def get(url: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def bring_up(setup: Setup, args: argparse.Namespace) -> tuple[str, str, str, str]:
    """The bed, the replica and the gateway. Returns (the replica's endpoint, its engine key, the gateway's URL,
    an API key)."""
    import testbed as tb
    from sqlalchemy import select
    from testbed.fleet import workers_yaml, write_fleet
    from testbed.llamacpp import SMOLLM2_MODEL, build_llamacpp_archive, find_assets, place_model

    from lmstack.api.services.keys import create_key
    from lmstack.api.services.users import create_user
    from lmstack.config import Settings
    from lmstack.gitsource import load_source
    from lmstack.reconcile.apply import apply_source
    from lmstack.state import Replica, open_database

    assets = find_assets()
    if isinstance(assets, str):
        raise RuntimeError(assets)
    tb.preflight()
    config = tb.BedConfig(hosts=1, prefix="lmsrmb", bridge=setup.bridge, subnet="10.215.0",
                          state_dir=Path("/var/tmp/lmstack-realmodel-bench"))
    t0 = time.monotonic()
    setup.bed = bed = tb.TestBed.start(config)
    archive = build_llamacpp_archive(config.state_dir / "llamacpp-image.tar", assets.server)
    bed.load_image(archive.path)
    (host,) = bed.hosts
    cache = config.state_dir / "models" / host.name  # removed with the bed
    place_model(assets.model, cache)
    print(f"test bed up with {archive.name} loaded ({time.monotonic() - t0:.1f} s)", flush=True)

    database_url = setup.create_database()
    engine_args = json.dumps(["--threads", str(args.threads)])
    repo = write_fleet(setup.workdir / "fleet", bed, {f"{MODEL}.yaml": (
        f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: {MODEL}}}\nspec:\n"
        f"  backend: llamacpp\n  model: {SMOLLM2_MODEL}\n  image: {archive.name}\n  replicas: 1\n"
        f"  resources: {{gpus: 0}}\n  health: {{startupTimeout: 180s}}\n  args: {engine_args}\n")},
        workers=workers_yaml([host], model_cache=lambda _: cache),
        message=f"{MODEL}, one replica, for the real-model bench")
    source = load_source(repo=str(repo), ref="HEAD", directory=None,
                         settings=Settings(home=setup.workdir / "home", mount_roots=[cache.parent]))
    database = open_database(Settings(database_url=database_url))
    try:
        t0 = time.monotonic()
        _, report = apply_source(source, database, ssh_key=bed.ssh_key, known_hosts=bed.known_hosts)
        if report is None or not report.ok:
            raise RuntimeError(f"apply failed: {[r.message for r in report.failed] if report else 'declined'}")
        with database.session() as session:
            endpoint, engine_key = session.execute(select(Replica.endpoint, Replica.engine_key)).one()
            create_user(session, name="bench", password=secrets.token_urlsafe(24), role="viewer")
            key = create_key(session, user="bench", name="real-model-bench").token
        print(f"applied: replica {MODEL}/0 ready at {endpoint} ({time.monotonic() - t0:.1f} s)", flush=True)
    finally:
        database.close()

    # The gateway: exactly `lmstack serve`, its own process (and process group), default settings.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = setup.workdir / "lmstack-serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMSTACK_")}
    env.update({"LMSTACK_DATABASE_URL": database_url, "LMSTACK_JWT_SECRET": secrets.token_hex(32),
                "LMSTACK_HOME": str(setup.workdir / "home"), "PYTHONUNBUFFERED": "1"})
    if args.key_cache_s is not None:
        env["LMSTACK_KEY_CACHE_S"] = str(args.key_cache_s)
    with log.open("ab") as out:
        setup.gateway = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.argv[0] = 'lmstack'; from lmstack.cli.main import run; run()",
             "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    gateway = f"http://127.0.0.1:{port}"
    wait_until("lmstack serve to list the model",
               lambda: MODEL.encode() in get(f"{gateway}/v1/models", key)[1], 60, setup.gateway, log)
    return str(endpoint), str(engine_key), gateway, key


# -- the table -------------------------------------------------------------------------------------------


@dataclass
class Results:
    runs: dict[tuple[int, str], list[Run]] = field(default_factory=dict)  # (streams, target): the tokens/s runs
    arrivals: dict[tuple[int, str], list[StreamResult]] = field(default_factory=dict)  # the random-arrival requests

    def ttfts_ms(self, concurrency: int, name: str) -> list[float]:
        return [r.ttft_s * 1000 for r in self.arrivals[concurrency, name]]


def measure(endpoint: str, engine_key: str, gateway: str, key: str, gateway_pid: int,
            args: argparse.Namespace) -> Results:
    # Direct requests carry the engine's own key, as the gateway's do.
    targets = {"direct": (endpoint, engine_key), "gateway": (gateway, key)}
    results = Results()
    runs = results.runs
    before, began = cpu_s(gateway_pid), time.monotonic()
    time.sleep(3)  # idle: what the gateway spends with no requests (registry refresh, usage flush)
    args.idle_cpu_ms_per_s = (cpu_s(gateway_pid) - before) * 1000 / (time.monotonic() - began)
    for concurrency in args.concurrency:
        for base, token in targets.values():  # warm-up: connections, the prompt cache
            run_once(base, token, concurrency, args.max_tokens)
        for i in range(args.runs):
            for name in list(targets) if i % 2 == 0 else list(reversed(targets)):
                base, token = targets[name]
                run = run_once(base, token, concurrency, args.max_tokens,
                               cpu_of=gateway_pid if name == "gateway" else None)
                runs.setdefault((concurrency, name), []).append(run)
            print(f"  {concurrency} at once, run {i + 1}/{args.runs}: " + ", ".join(
                f"{name} {runs[concurrency, name][-1].tokens_per_s:.1f} tok/s "
                f"TTFT {statistics.median(runs[concurrency, name][-1].ttfts_ms):.1f} ms" for name in targets),
                flush=True)
        # Random arrivals, in short rounds (the engine's TTFT drifts over minutes): direct and the gateway
        # alternate round by round.
        per_round = min(TTFT_ROUND, args.ttft_requests)
        rounds = max(1, math.ceil(args.ttft_requests / per_round))
        for i in range(rounds):
            for name in list(targets) if i % 2 == 0 else list(reversed(targets)):
                base, token = targets[name]
                done = random_arrivals(base, token, concurrency, per_round, args.ttft_tokens, args.pause_ms / 1000,
                                       seed=i)
                results.arrivals.setdefault((concurrency, name), []).extend(done)
            if (i + 1) % 5 and i + 1 < rounds:
                continue
            print(f"  {concurrency} streams, random arrivals, round {i + 1}/{rounds}: " + ", ".join(
                f"{name} mean TTFT {statistics.fmean(results.ttfts_ms(concurrency, name)):.1f} ms "
                f"({len(results.arrivals[concurrency, name])} requests)" for name in targets), flush=True)
    return results


def mean_difference(base: list[float], other: list[float]) -> tuple[float, float]:
    """mean(other) - mean(base), and the half-width of its 95% confidence interval (normal approximation)."""
    added = statistics.fmean(other) - statistics.fmean(base)
    if min(len(base), len(other)) < 2:
        return added, math.nan  # one value each: no spread to tell
    error = math.sqrt(statistics.variance(base) / len(base) + statistics.variance(other) / len(other))
    return added, 1.96 * error


def print_table(results: Results, args: argparse.Namespace, wire: WireTimes | None) -> None:
    runs = results.runs
    cpus = ("the engine, the gateway and this client sharing every CPU" if args.shared_cpus
            else "the engine on a CPU of its own")
    print(f"\nllama-server --threads {args.threads}, SmolLM2-135M Q4_1 on CPU, {cpus}.\ntokens/s: medians of "
          f"{args.runs} runs of {args.max_tokens} tokens a stream. TTFT: {args.ttft_requests} requests of "
          f"{args.ttft_tokens} tokens per stream, each after a random pause of up to {args.pause_ms:g} ms (mean, and "
          "p50).")
    header = (f"{'streams':>7}  {'direct tok/s':>12}  {'gateway tok/s':>13}  {'ratio':>6}  {'target':>7}  "
              f"{'direct TTFT':>17}  {'gateway TTFT':>17}  {'added (95% CI)':>17}  {'target':>7}  "
              f"{'gateway CPU/token':>17}")
    print(header)
    print("-" * len(header))
    splits: dict[int, dict[str, tuple[float, float]]] = {}
    for concurrency in args.concurrency:
        direct, through = runs[concurrency, "direct"], runs[concurrency, "gateway"]
        direct_tps = statistics.median(r.tokens_per_s for r in direct)
        through_tps = statistics.median(r.tokens_per_s for r in through)
        # Each gateway run against the direct run next to it: the machine's speed drifts less within a pair.
        ratio = statistics.median(g.tokens_per_s / d.tokens_per_s for d, g in zip(direct, through, strict=True))
        direct_ttft, through_ttft = results.ttfts_ms(concurrency, "direct"), results.ttfts_ms(concurrency, "gateway")
        splits[concurrency] = split = _split(results, concurrency, wire) if wire is not None else {}
        # With the wire's view, what the gateway adds is its path and the engine's step; the wait for the step in
        # progress depends only on when a request happened to arrive (printed below, it averages out).
        added, error = ((split["path"][0] + split["step"][0], math.hypot(split["path"][1], split["step"][1]))
                        if split else mean_difference(direct_ttft, through_ttft))
        ratio_ok = "met" if ratio >= TARGET_RATIO else "MISSED"
        added_ok = "met" if added < TARGET_ADDED_TTFT_MS else "MISSED"
        cpu_per_token_us = statistics.median(
            ((r.gateway_cpu_ms or 0.0) - args.idle_cpu_ms_per_s * r.wall_s) * 1000 / (concurrency * args.max_tokens)
            for r in through)
        print(f"{concurrency:>7}  {direct_tps:>12.1f}  {through_tps:>13.1f}  {ratio:>6.1%}  {ratio_ok:>7}  "
              f"{_ttft(direct_ttft):>17}  {_ttft(through_ttft):>17}  {f'{added:+.2f} ± {error:.2f} ms':>17}  "
              f"{added_ok:>7}  {cpu_per_token_us:>14.0f} us")
    print(f"\nTargets: gateway tokens/s >= {TARGET_RATIO:.0%} of direct; added TTFT < {TARGET_ADDED_TTFT_MS:g} ms.")
    if wire is not None:
        print("Added TTFT: the gateway's path plus the engine's step, gateway minus direct (the split below).")
        print("\nTTFT split, means, gateway minus direct (95% CI), from the engine's side of the bridge (kernel packet "
              "times):\n  path: client TTFT less the engine's (client -> engine -> client, through the gateway or not)"
              "\n  wait: from arrival to the end of the batch step in progress (0 when the engine was idle)"
              "\n  step: from there to the first token leaving the engine\n  client view: the whole TTFT")
        for concurrency, split in splits.items():
            print(f"{concurrency:>7} streams: " + ", ".join(
                f"{part} {mean:+.2f} ± {error:.2f} ms" for part, (mean, error) in split.items()))
    else:
        print("Added TTFT: mean gateway TTFT minus mean direct TTFT (no packet socket here: the engine's side "
              "could not be seen, so the wait for the batch step in progress is in it).")
    print("Gateway CPU/token: the `lmstack serve` process's CPU time during a tokens/s run, less what it uses idle "
          f"({args.idle_cpu_ms_per_s:.1f} ms a second: registry refresh, usage flush), over the tokens it relayed. "
          "Where cores are short, the engine cannot have that CPU.")
    print("\nTTFT when all streams start at the same instant (the tokens/s runs; see the top of this script):")
    for concurrency in args.concurrency:
        direct, through = runs[concurrency, "direct"], runs[concurrency, "gateway"]
        direct_ttft = [t for r in direct for t in r.ttfts_ms]
        through_ttft = [t for r in through for t in r.ttfts_ms]
        added, error = mean_difference(direct_ttft, through_ttft)
        print(f"{concurrency:>7} at once: direct {_ttft(direct_ttft)}, gateway {_ttft(through_ttft)}, "
              f"mean added {added:+.1f} ± {error:.1f} ms")
    spread = {name: [r.tokens_per_s for (_, n), rs in runs.items() if n == name for r in rs]
              for name in ("direct", "gateway")}
    print("Run-to-run range of tokens/s: " + "; ".join(
        f"{name} {min(values):.1f}..{max(values):.1f}" for name, values in spread.items()))
    print(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.")


def _split(results: Results, concurrency: int, wire: WireTimes) -> dict[str, tuple[float, float]]:
    """Per part of the TTFT (path, wait, step, client view): gateway minus direct, (mean, 95% half-width)."""
    parts: dict[str, dict[str, list[float]]] = {}
    for name in ("direct", "gateway"):
        for result in results.arrivals[concurrency, name]:
            split = wire.split(result)
            if split is None:
                continue
            values = (*split, result.ttft_s * 1000)
            for part, value in zip(("path", "wait", "step", "client view"), values, strict=True):
                parts.setdefault(part, {}).setdefault(name, []).append(value)
    if any(len(parts.get("path", {}).get(name, [])) < 10 for name in ("direct", "gateway")):
        return {}  # the wire saw too few: nothing to split
    return {part: mean_difference(values["direct"], values["gateway"]) for part, values in parts.items()}


def _ttft(values: list[float]) -> str:
    return f"{statistics.fmean(values):.1f} ({statistics.median(values):.1f}) ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="tokens/s runs per row (default 7)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="streams at once (default 1 4)")
    parser.add_argument("--ttft-requests", type=int, default=120, metavar="N",
                        help="TTFT: requests per stream and target at random arrival times (default 120)")
    parser.add_argument("--ttft-tokens", type=int, default=16, metavar="N",
                        help="TTFT: tokens per request (default 16)")
    parser.add_argument("--pause-ms", type=float, default=100.0,
                        help="TTFT: each request comes after a random pause of up to this (default 100)")
    parser.add_argument("--shared-cpus", action="store_true",
                        help="let the engine, the gateway and this client share every CPU (default: the engine on "
                        "a CPU of its own, as on a worker host of its own)")
    parser.add_argument("--threads", type=int, default=1, help="llama-server --threads (default 1)")
    parser.add_argument("--key-cache-s", type=float, metavar="S",
                        help="LMSTACK_KEY_CACHE_S for the gateway (default: its own, 1 s; at most 5)")
    args = parser.parse_args()
    if max(args.concurrency) > 4:
        print("note: the deployment has 4 slots (llama-server -np 4): more streams than that queue", file=sys.stderr)

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    setup = Setup(workdir=Path(tempfile.mkdtemp(prefix="lmstack-real-model-bench-")),
                  admin_url=os.environ.get("LMSTACK_TEST_POSTGRES", DEFAULT_ADMIN_URL))
    started = time.monotonic()
    try:
        endpoint, engine_key, gateway, key = bring_up(setup, args)
        print(f"measuring: direct {endpoint} vs gateway {gateway} (runs alternate)", flush=True)
        assert setup.gateway is not None
        if not args.shared_cpus:
            setup.pin()
        wire = setup.watch_wire(endpoint)
        results = measure(endpoint, engine_key, gateway, key, setup.gateway.pid, args)
        print_table(results, args, wire)
        print(f"Wall time {time.monotonic() - started:.0f} s")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: removing the test bed and dropping the database", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        setup.clean_up()


if __name__ == "__main__":
    sys.exit(main())
