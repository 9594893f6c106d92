"""Prefix-aware routing against power of two choices (P2C) against direct round-robin, on a real model: time to
first token (p50, p99) and tokens/s of streamed chat completions to two llama.cpp replicas of SmolLM2-135M.

    .venv/bin/python bench/prefix_routing.py              # as root, like the test bed
    .venv/bin/python bench/prefix_routing.py --requests 64 --concurrency 2 --cache-ram 0

Brings up everything itself and removes it at the end (also on Ctrl-C): a test bed of two hosts of its own
(prefix lmspfx, bridge lmspfxbr0, subnet 10.216.0.0/24), llama-server and SmolLM2 from the test assets
(scripts/prepare_test_assets.sh), a throwaway database, a `llamacpp` deployment of two replicas (one per host,
each pinned to a CPU of its own where there are enough), and two `lmstack serve` processes on that database:
one with LMSTACK_ROUTING=prefix (the default), one with LMSTACK_ROUTING=p2c. "Direct" sends the requests to the
two engines in turn, as a client-side round-robin would.

Workloads (each request: a stream of --max-tokens tokens, greedy, from --concurrency client threads):
- shared: --prompts long system prompts (about --prompt-tokens tokens each) with a short user turn, picked at
  random: tenants or applications each with its own instructions. The system prompts are new for each
  routing (another seed), so no routing finds what the one before it left in the engines' caches.
- unique: every request a long prompt of its own: no shared beginning; prefix routing must not lose here.

Each engine keeps prompts in its slots (llama-server -np 4 here: four) and, with --cache-ram above 0, in host
memory as well. A GPU engine's prompt cache is its KV cache in GPU memory, bounded, shared with the requests
running (vLLM's automatic prefix caching, SGLang's radix cache); --cache-ram 0 (the default) bounds
llama.cpp's the same way, to its slots. With llama.cpp's default 8 GiB of host memory for a 135M model every
prompt stays cached on every replica that has seen it, and routing matters only for each prompt's first
request on each replica (try --cache-ram 8192).

Figures only; the issue's goal is printed beside them: prefix-aware TTFT p50 at least 2x lower than P2C on
"shared", and no loss on "unique".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from real_model import DEFAULT_ADMIN_URL, REPO_ROOT, Setup, get, wait_until

MODEL = "smollm2"
WORDS = ("lighthouse", "harbour", "keeper", "storm", "ledger", "signal", "chart", "tide", "beacon", "rope", "anchor",
         "compass", "lantern", "gull", "pier", "reef", "mast", "sail", "current", "shore", "cliff", "brass", "clock",
         "oil", "wick", "fog", "horn", "island", "supply", "boat")
GOAL_RATIO = 2.0


@dataclass
class Sample:
    ttft_s: float
    tokens: int
    seconds: float  # the whole stream
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, found in the engine's cache (usage.prompt_tokens_details)


@dataclass
class Row:
    workload: str
    routing: str
    samples: list[Sample] = field(default_factory=list)
    failed: int = 0

    def ttft_ms(self, q: float) -> float:
        values = sorted(s.ttft_s * 1000 for s in self.samples)
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")

    def cached_share(self) -> float:
        """The share of prompt tokens the engines had cached: what routing is for."""
        prompt = sum(s.prompt_tokens for s in self.samples)
        return sum(s.cached_tokens for s in self.samples) / prompt if prompt else float("nan")

    def tokens_per_s(self, wall_s: float) -> float:
        return sum(s.tokens for s in self.samples) / wall_s if wall_s else 0.0


def text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of plain words (SmolLM2 takes most of these words as one token each)."""
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def stream(base: str, key: str, messages: list[dict[str, str]], max_tokens: int) -> Sample:
    import http.client

    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    try:
        started = time.monotonic()
        connection.request("POST", "/v1/chat/completions", body,
                           {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        answer = connection.getresponse()
        if answer.status != 200:
            raise RuntimeError(f"{base} answered {answer.status}: {answer.read()[:300]!r}")
        first, tokens, prompt_tokens, cached = None, 0, 0, 0
        for raw in answer:
            if not raw.startswith(b"data: {"):
                continue
            chunk = json.loads(raw[6:])
            if chunk.get("error"):
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
                tokens, prompt_tokens = int(usage["completion_tokens"]), int(usage.get("prompt_tokens") or 0)
                cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                first = time.monotonic()
        if first is None:
            raise RuntimeError("a stream without content")
        return Sample(first - started, tokens, time.monotonic() - started, prompt_tokens, cached)
    finally:
        connection.close()


def run(row: Row, targets: list[tuple[str, str]], requests: list[list[dict[str, str]]], concurrency: int,
        max_tokens: int) -> float:
    """Send `requests` from `concurrency` threads; targets are (base URL, key) taken in turn. Returns wall s."""
    lock = threading.Lock()
    queue = list(enumerate(requests))

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                index, messages = queue.pop(0)
            base, key = targets[index % len(targets)]
            try:
                sample = stream(base, key, messages, max_tokens)
            except Exception as exc:  # counted and shown: a bench reports, it does not stop at one failure
                with lock:
                    row.failed += 1
                print(f"  {row.routing}: request failed: {exc}", file=sys.stderr)
                continue
            with lock:
                row.samples.append(sample)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


def workload(kind: str, seed: int, args: argparse.Namespace) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    if kind == "shared":
        systems = [f"You are assistant {seed}-{n}. Rules: " + text(rng, args.prompt_tokens)
                   for n in range(args.prompts)]
        return [[{"role": "system", "content": rng.choice(systems)},
                 {"role": "user", "content": f"Question {i}: " + text(rng, 8)}] for i in range(args.requests)]
    return [[{"role": "system", "content": f"Request {seed}-{i}. " + text(rng, args.prompt_tokens)},
             {"role": "user", "content": "Summarise."}] for i in range(args.requests)]


class Bench:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.gateways: list[subprocess.Popen[bytes]] = []

    def bring_up(self, args: argparse.Namespace) -> tuple[list[tuple[str, str]], dict[str, str], str]:
        """The bed, two replicas and two gateways: ([(engine endpoint, engine key)], {routing: URL}, API key)."""
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
        config = tb.BedConfig(hosts=2, prefix="lmspfx", bridge=self.setup.bridge, subnet="10.216.0",
                              state_dir=Path("/var/tmp/lmstack-prefix-bench"))
        self.setup.bed = bed = tb.TestBed.start(config)
        archive = build_llamacpp_archive(config.state_dir / "llamacpp-image.tar", assets.server)
        bed.load_image(archive.path)
        caches = {host.name: config.state_dir / "models" / host.name for host in bed.hosts}
        for cache in caches.values():
            place_model(assets.model, cache)
        database_url = self.setup.create_database()
        engine_args = json.dumps(["--threads", "1", "-c", str(4 * (args.prompt_tokens + 256)),
                                  "--cache-ram", str(args.cache_ram)])
        repo = write_fleet(self.setup.workdir / "fleet", bed, {f"{MODEL}.yaml": (
            f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: {MODEL}}}\nspec:\n"
            f"  backend: llamacpp\n  model: {SMOLLM2_MODEL}\n  image: {archive.name}\n  replicas: 2\n"
            f"  resources: {{gpus: 0}}\n  placement: {{strategy: spread}}\n  health: {{startupTimeout: 180s}}\n"
            f"  args: {engine_args}\n")},
            workers=workers_yaml(bed.hosts, model_cache=lambda host: caches[host.name]),
            message="two replicas for the prefix routing bench")
        source = load_source(repo=str(repo), ref="HEAD", directory=None,
                             settings=Settings(home=self.setup.workdir / "home",
                                               mount_roots=[config.state_dir / "models"]))
        database = open_database(Settings(database_url=database_url))
        try:
            _, report = apply_source(source, database, ssh_key=bed.ssh_key, known_hosts=bed.known_hosts)
            if report is None or not report.ok:
                raise RuntimeError(f"apply failed: {[r.message for r in report.failed] if report else 'declined'}")
            with database.session() as session:
                engines = [(str(e), str(k)) for e, k in session.execute(
                    select(Replica.endpoint, Replica.engine_key).order_by(Replica.ordinal))]
                create_user(session, name="bench", password=secrets.token_urlsafe(24), role="viewer")
                key = create_key(session, user="bench", name="prefix-bench").token
        finally:
            database.close()
        print(f"applied: two replicas at {', '.join(e for e, _ in engines)}", flush=True)
        gateways = {routing: self._serve(database_url, routing, key) for routing in ("prefix", "p2c")}
        self._pin(bed)
        return engines, gateways, key

    def _serve(self, database_url: str, routing: str, key: str) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        log = self.setup.workdir / f"serve-{routing}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMSTACK_")}
        env.update({"LMSTACK_DATABASE_URL": database_url, "LMSTACK_JWT_SECRET": secrets.token_hex(32),
                    "LMSTACK_HOME": str(self.setup.workdir / f"home-{routing}"), "LMSTACK_ROUTING": routing})
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-c", "import sys; sys.argv[0] = 'lmstack'; from lmstack.cli.main import run; run()",
                 "serve", "--host", "127.0.0.1", "--port", str(port)],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
        self.gateways.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_until(f"lmstack serve ({routing}) to list the model",
                   lambda: MODEL.encode() in get(f"{url}/v1/models", key)[1], 60, process, log)
        return url

    def _pin(self, bed: Any) -> None:
        """Each engine on a CPU of its own when there are enough (on 2 CPUs they share them with the rest)."""
        cpus = os.cpu_count() or 1
        if cpus < 3:
            print(f"note: {cpus} CPUs: the engines, the gateways and this client share them", flush=True)
            return
        for index, host in enumerate(bed.hosts):
            found = bed.docker(host, "ps", "-q", "--filter", f"label=lmstack.deployment={MODEL}").stdout.split()
            for container in found:
                bed.docker(host, "update", "--cpuset-cpus", str(cpus - 1 - index), container)

    def clean_up(self) -> None:
        for process in self.gateways:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        self.setup.clean_up()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48, help="requests per workload and routing (default 48)")
    parser.add_argument("--concurrency", type=int, default=2, help="client threads (default 2)")
    parser.add_argument("--prompts", type=int, default=8, help="shared: distinct system prompts (default 8)")
    parser.add_argument("--prompt-tokens", type=int, default=600, help="system prompt length (default 600)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per answer (default 8)")
    parser.add_argument("--cache-ram", type=int, default=0,
                        help="llama-server --cache-ram in MiB (default 0: the slots only, as a GPU's KV cache)")
    args = parser.parse_args()

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    setup = Setup(workdir=Path(tempfile.mkdtemp(prefix="lmstack-prefix-bench-")),
                  admin_url=os.environ.get("LMSTACK_TEST_POSTGRES", DEFAULT_ADMIN_URL), bridge="lmspfxbr0")
    bench = Bench(setup)
    started = time.monotonic()
    try:
        engines, gateways, key = bench.bring_up(args)
        routings: dict[str, list[tuple[str, str]]] = {
            "prefix-aware": [(gateways["prefix"], key)], "p2c": [(gateways["p2c"], key)], "direct round-robin": engines}
        rows: list[tuple[Row, float]] = []
        for kind in ("shared", "unique"):
            for seed, (name, targets) in enumerate(routings.items()):
                row = Row(kind, name)
                warm = workload(kind, 1000 + seed, argparse.Namespace(**{**vars(args), "requests": 2}))
                run(Row(kind, name), targets, warm, 1, args.max_tokens)  # connections and engines warm
                wall = run(row, targets, workload(kind, seed, args), args.concurrency, args.max_tokens)
                rows.append((row, wall))
                print(f"  {kind:7} {name:19} TTFT p50 {row.ttft_ms(0.5):7.0f} ms  p99 {row.ttft_ms(0.99):7.0f} ms  "
                      f"{row.tokens_per_s(wall):5.1f} tokens/s  prompt cached {row.cached_share():4.0%}  "
                      f"({len(row.samples)} ok, {row.failed} failed)",
                      flush=True)
        print_table(rows, args)
        print(f"Wall time {time.monotonic() - started:.0f} s")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: removing the test bed and dropping the database", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.clean_up()


def print_table(rows: list[tuple[Row, float]], args: argparse.Namespace) -> None:
    print(f"\n{args.requests} requests per row, {args.concurrency} at a time, {args.max_tokens} tokens each; shared: "
          f"{args.prompts} system prompts of ~{args.prompt_tokens} tokens; llama-server --cache-ram {args.cache_ram}")
    print(f"{'workload':9}{'routing':21}{'TTFT p50':>10}{'TTFT p99':>10}{'tokens/s':>10}{'cached':>8}")
    by: dict[tuple[str, str], Row] = {}
    for row, wall in rows:
        by[(row.workload, row.routing)] = row
        print(f"{row.workload:9}{row.routing:21}{row.ttft_ms(0.5):8.0f}ms{row.ttft_ms(0.99):8.0f}ms"
              f"{row.tokens_per_s(wall):10.1f}{row.cached_share():8.0%}")
    shared = by[("shared", "p2c")].ttft_ms(0.5) / by[("shared", "prefix-aware")].ttft_ms(0.5)
    unique = by[("unique", "p2c")].ttft_ms(0.5) / by[("unique", "prefix-aware")].ttft_ms(0.5)
    print(f"shared: P2C p50 / prefix-aware p50 = {shared:.2f}x (goal >= {GOAL_RATIO:.0f}x); "
          f"unique: {unique:.2f}x (goal: no loss, about 1x)")


if __name__ == "__main__":
    sys.exit(main())
