"""How long a full `lmstack apply` from scratch takes on 1, 3 and 6 hosts, and where the time goes.

    .venv/bin/python bench/apply_fanout.py                  # sizes 1 3 6, one run each (after a warm-up)
    .venv/bin/python bench/apply_fanout.py --sizes 1 6 --repeat 3 --parallel 16 --poll 0.2

Needs root and what the multi-host test bed needs (tests/testbed/bed.py), and a PostgreSQL on
127.0.0.1:5432 with trust auth for user postgres (LMSTACK_TEST_POSTGRES overrides the admin URL). The bed
is brought up once with as many hosts as the biggest size (it waits while another run holds its lock); a
throwaway database is created for the run. Both are removed at the end, also on Ctrl-C or SIGTERM.

Each size N: a fleet repository committed with git (the bed's first N hosts in the inventory, one Worker per
host, one `backend: vllm` deployment of the stand-in engine image with `gpus: 0`, 2N replicas, `placement:
{workers: [the N workers], strategy: spread}`), empty state tables, then one apply exactly as
`apply_source` does it (load the source, Applier, prepare, execute), and a check that the plan put 2
replicas on every host and that 2 ready containers run on every host. Between sizes the containers are
removed with the docker CLI on each host's socket.

Nothing in lmstack is edited: the phases are timed from outside by wrapping, for the duration of a run,
the functions `Applier.prepare()` calls (gather_facts, load_observed, observe_live, plan), `Executor`'s
readiness steps, `DockerPool`'s calls and its SSH connect, the SDK's per-channel `docker system
dial-stdio`, and `Database.session`. Every wrapped call is an interval on the clock; because actions run
in parallel (`--parallel` threads), a category's figure is the wall time during which at least one call of
that category was in flight (the union of its intervals), so shares of the total may add up to more than
100 %. "sum" figures add up the calls' own durations (thread-seconds). Figures only, no assertions on
timings.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.transport.sshconn  # type: ignore[import-untyped]
import requests
from benchdb import throwaway_database
from sqlalchemy import select

from lmstack.config import Settings
from lmstack.gitsource import init_repository, load_source
from lmstack.nodes.docker import DockerPool
from lmstack.reconcile import apply as apply_module
from lmstack.reconcile.apply import Applier
from lmstack.reconcile.execute import Executor
from lmstack.reconcile.model import ActionKind
from lmstack.state import Base, Database, Replica, open_database

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "bench"
REPLICAS_PER_HOST = 2
DOCKER_CATEGORIES = ("connect", "list", "create", "remove", "inspect", "ports")
READY_CATEGORIES = ("ready", "after_start")


# -- intervals -----------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Every timed call of one apply as (category, start, end), on time.perf_counter's clock."""

    spans: list[tuple[str, float, float]] = field(default_factory=list)
    requests: list[tuple[str, float]] = field(default_factory=list)  # (endpoint, seconds) of Docker API requests
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, category: str, start: float, end: float) -> None:
        with self.lock:
            self.spans.append((category, start, end))

    def add_request(self, endpoint: str, seconds: float) -> None:
        with self.lock:
            self.requests.append((endpoint, seconds))

    def of(self, *categories: str) -> list[tuple[float, float]]:
        return [(s, e) for c, s, e in self.spans if c in categories]

    def count(self, *categories: str) -> int:
        return len(self.of(*categories))

    def union(self, *categories: str) -> float:
        return union_s(self.of(*categories))

    def sum(self, *categories: str) -> float:
        return sum(e - s for s, e in self.of(*categories))


def union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _timed(recorder: Recorder, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            recorder.add(category, start, time.perf_counter())

    return wrapper


def _timed_session(recorder: Recorder, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Database.session, timed from entering the block to leaving it (queries and commit)."""
    @functools.wraps(fn)
    @contextlib.contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        start = time.perf_counter()
        try:
            with fn(*args, **kwargs) as session:
                yield session
        finally:
            recorder.add("db", start, time.perf_counter())

    return wrapper


def _timed_send(recorder: Recorder, fn: Callable[..., Any]) -> Callable[..., Any]:
    """requests.Session.send, also noting the endpoint (method and path, ids and API version taken out)."""
    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(self, request, **kwargs)
        finally:
            end = time.perf_counter()
            recorder.add("request", start, end)
            path = _API_VERSION.sub("", request.path_url.split("?", 1)[0])
            recorder.add_request(f"{request.method} {_CONTAINER_ID.sub('{id}', path)}", end - start)

    return wrapper


_API_VERSION = re.compile(r"^/v\d+(\.\d+)?")
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


@contextlib.contextmanager
def instrumented(recorder: Recorder) -> Iterator[None]:
    """Wrap the phases and calls with timers for the duration of the block, then put the originals back."""
    targets: list[tuple[Any, str, str]] = [
        (apply_module, "gather_facts", "facts"),
        (apply_module, "load_observed", "load_observed"),
        (apply_module, "observe_live", "observe"),
        (apply_module, "make_plan", "plan"),
        (Applier, "execute", "execute"),
        (Executor, "_wait_ready", "ready"),
        (Executor, "_after_start", "after_start"),
        (DockerPool, "_connect", "connect"),
        (DockerPool, "list_managed", "list"),
        (DockerPool, "create", "create"),
        (DockerPool, "remove", "remove"),
        (DockerPool, "inspect", "inspect"),
        (DockerPool, "used_ports", "ports"),
        # One SSH channel running `docker system dial-stdio` on the host: a new HTTP connection of the pool.
        (docker.transport.sshconn.SSHConnection, "connect", "channel"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    saved.append((Database, "session", Database.session))
    saved.append((requests.Session, "send", requests.Session.send))
    try:
        for owner, name, category in targets:
            setattr(owner, name, _timed(recorder, category, getattr(owner, name)))
        Database.session = _timed_session(recorder, Database.session)  # type: ignore[method-assign]
        # One HTTP request to the Docker API (the SDK's APIClient is a requests.Session; nothing else in an
        # apply uses requests: readiness probes go through urllib).
        requests.Session.send = _timed_send(recorder, requests.Session.send)  # type: ignore[method-assign]
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# -- the fleet -----------------------------------------------------------------------------------------


def write_fleet(root: Path, bed: Any, hosts: int, image: str) -> Path:
    """A manifests repository for the bed's first `hosts` hosts, committed like a user would."""
    chosen = bed.hosts[:hosts]
    repo = root / "fleet"
    (repo / "inventory").mkdir(parents=True)
    (repo / "manifests").mkdir()
    inventory = ["[gpu]"] + [
        f"{h.name} ansible_host={h.address} ansible_user={h.user} ansible_port={h.ssh_port} "
        "ansible_python_interpreter=/usr/bin/python3" for h in chosen]
    (repo / "inventory" / "hosts.ini").write_text("\n".join(inventory) + "\n")
    (repo / "manifests" / "workers.yaml").write_text("".join(
        f"---\napiVersion: lmstack.dev/v1\nkind: Worker\nmetadata: {{name: {h.name}}}\n"
        f"spec: {{host: {h.name}, modelCache: {root / 'models' / h.name}}}\n" for h in chosen))
    workers = ", ".join(h.name for h in chosen)
    (repo / "manifests" / f"{DEPLOYMENT}.yaml").write_text(
        f"apiVersion: lmstack.dev/v1\nkind: Deployment\nmetadata: {{name: {DEPLOYMENT}}}\nspec:\n"
        f"  backend: vllm\n  model: test/{DEPLOYMENT}\n  image: {image}\n"
        f"  replicas: {REPLICAS_PER_HOST * hosts}\n  resources: {{gpus: 0}}\n"
        f"  placement: {{workers: [{workers}], strategy: spread}}\n  health: {{startupTimeout: 60s}}\n")
    init_repository(repo, f"bench: {hosts} hosts")
    return repo


def empty_tables(database: Database) -> None:
    tables = ", ".join(f'"{table.name}"' for table in Base.metadata.sorted_tables)
    with database.engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")


def clean_containers(bed: Any) -> None:
    """Remove every container on every host (docker CLI on the host's own socket, not over SSH)."""
    for host in bed.hosts:
        ids = bed.docker(host, "ps", "-aq").stdout.split()
        if ids:
            bed.docker(host, "rm", "-f", "-v", *ids)


def running_containers(bed: Any, hosts: int) -> dict[str, int]:
    """host -> how many running containers of the deployment it has."""
    found = {}
    for host in bed.hosts[:hosts]:
        lines = bed.docker(host, "ps", "--filter", f"label=lmstack.deployment={DEPLOYMENT}",
                           "--filter", "status=running", "-q").stdout.split()
        found[host.name] = len(lines)
    return found


# -- one apply -----------------------------------------------------------------------------------------


@dataclass
class Result:
    hosts: int
    containers: int
    total_s: float
    phases: dict[str, float]  # source, init, prepare, execute, close: sequential, wall
    recorder: Recorder
    handshakes: int
    action_s: list[float]


def run_once(bed: Any, database: Database, hosts: int, work: Path, *, parallel: int, poll_s: float) -> Result:
    empty_tables(database)
    clean_containers(bed)
    repo = write_fleet(work, bed, hosts, bed.standin_image)
    settings = Settings(home=work / "home", mount_roots=[work / "models"])  # the workers' caches (write_fleet)
    names = [h.name for h in bed.hosts[:hosts]]
    recorder = Recorder()
    phases: dict[str, float] = {}
    with instrumented(recorder):
        t0 = time.perf_counter()
        source = load_source(repo=str(repo), ref="HEAD", directory=None, settings=settings)
        t1 = time.perf_counter()
        applier = Applier(source, database, ssh_key=bed.ssh_key, known_hosts=bed.known_hosts,
                          parallel=parallel, poll_s=poll_s)
        t2 = time.perf_counter()
        with applier:
            survey = applier.survey()
            t3 = time.perf_counter()
            check_plan(survey.plan, names)
            t4 = time.perf_counter()
            report = applier.execute(survey)
            t5 = time.perf_counter()
            handshakes = sum(applier.pool.handshakes(name) for name in names)
        t6 = time.perf_counter()
    phases = {"source": t1 - t0, "init": t2 - t1, "prepare": t3 - t2, "execute": t5 - t4, "close": t6 - t5}
    total = (t6 - t0) - (t4 - t3)  # the plan check is the bench's, not apply's
    if not report.ok:
        raise RuntimeError(f"apply on {hosts} hosts failed: "
                           + "; ".join([r.message for r in report.failed] + list(report.errors)))
    running = running_containers(bed, hosts)
    if running != dict.fromkeys(names, REPLICAS_PER_HOST):
        raise RuntimeError(f"expected {REPLICAS_PER_HOST} running containers per host, found {running}")
    with database.session() as session:
        statuses = Counter(r.status for r in session.scalars(select(Replica)))
    if statuses != {"ready": REPLICAS_PER_HOST * hosts}:
        raise RuntimeError(f"expected {REPLICAS_PER_HOST * hosts} ready replicas, found {dict(statuses)}")
    return Result(hosts, REPLICAS_PER_HOST * hosts, total, phases, recorder, handshakes,
                  sorted(r.elapsed_s for r in report.results))


def check_plan(plan: Any, workers: list[str]) -> None:
    """The plan creates exactly REPLICAS_PER_HOST replicas on each worker, and nothing else."""
    kinds = Counter(action.kind for action in plan.changes)
    per_worker = Counter(action.placement.worker for action in plan.changes if action.placement)
    expected = dict.fromkeys(workers, REPLICAS_PER_HOST)
    if plan.unplaceable or kinds != {ActionKind.CREATE: REPLICAS_PER_HOST * len(workers)} or per_worker != expected:
        raise RuntimeError(f"unexpected plan: {dict(kinds)}, per worker {dict(per_worker)}, "
                           f"unplaceable {[u.reason for u in plan.unplaceable]}")


# -- output --------------------------------------------------------------------------------------------


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:3.0f}%" if whole > 0 else "  -"


def print_tables(results: list[Result], *, parallel: int, poll_s: float) -> None:
    print(f"\nlmstack apply from scratch on the test bed ({REPLICAS_PER_HOST} stand-in containers per host, "
          f"parallel={parallel}, poll={poll_s:g}s, {os.cpu_count()} CPUs)\n")
    header = (f"{'hosts':>5} {'ctrs':>4} {'total s':>8} {'facts s':>8} {'%':>4} {'docker/SSH s':>12} {'%':>4} "
              f"{'ready s':>8} {'%':>4} {'plan s':>7} {'handshakes':>10} {'calls/hs':>8} "
              f"{'requests':>8} {'channels':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        rec = r.recorder
        docker_s = rec.union(*DOCKER_CATEGORIES)
        ready_s = rec.union(*READY_CATEGORIES)
        facts_s = rec.union("facts")
        calls = rec.count("list", "create", "remove", "inspect", "ports")
        per_hs = f"{calls / r.handshakes:.1f}" if r.handshakes else "-"
        print(f"{r.hosts:>5} {r.containers:>4} {r.total_s:>8.2f} {facts_s:>8.2f} {_pct(facts_s, r.total_s):>4} "
              f"{docker_s:>12.2f} {_pct(docker_s, r.total_s):>4} {ready_s:>8.2f} {_pct(ready_s, r.total_s):>4} "
              f"{rec.union('plan'):>7.3f} {r.handshakes:>10} {per_hs:>8} {rec.count('request'):>8} "
              f"{rec.count('channel'):>8}")
    print("\n  facts: gather_facts (ansible-runner over SSH, one run for all hosts, plus its database upserts)")
    print("  docker/SSH: wall time with a Docker call in flight (connect, list, create, remove, inspect, ports)")
    print("  ready: wall time with a readiness wait in flight (HTTP polls of the engine, every poll s)")
    print("  handshakes: SSH connections the DockerPool made; calls/hs: Docker API calls per connection;")
    print("  requests: HTTP requests to the Docker API; channels: SSH channels opened for `docker system")
    print("  dial-stdio` on the host (one per new HTTP connection: requests/channels is the keep-alive reuse)")

    print("\nwhere the wall time went (s); count / thread-seconds of the calls in brackets\n")
    header = (f"{'hosts':>5} {'source':>6} {'init':>5} {'facts':>6} {'observe':>7} {'plan':>6} {'execute':>7} "
              f"{'connect':>14} {'channel':>15} {'list':>14} {'ports':>14} {'create':>15} {'ready':>15} {'db':>14} "
              f"{'other':>6}  action s min/med/max")
    print(header)
    print("-" * len(header))
    for r in results:
        rec = r.recorder

        def cell(category: str, width: int, rec: Recorder = rec) -> str:
            text = f"{rec.union(category):.2f} [{rec.count(category)}/{rec.sum(category):.2f}]"
            return f"{text:>{width}}"

        covered = union_s(rec.of("facts", "load_observed", "observe", "plan", "db", "ready", "after_start",
                                 *DOCKER_CATEGORIES))
        other = r.total_s - r.phases["close"] - covered
        actions = r.action_s
        print(f"{r.hosts:>5} {r.phases['source']:>6.2f} {r.phases['init']:>5.2f} {rec.union('facts'):>6.2f} "
              f"{rec.union('observe'):>7.2f} {rec.union('plan'):>6.3f} {r.phases['execute']:>7.2f} "
              f"{cell('connect', 14)} {cell('channel', 15)} {cell('list', 14)} {cell('ports', 14)} "
              f"{cell('create', 15)} {cell('ready', 15)} {cell('db', 14)} {other:>6.2f}  "
              f"{actions[0]:.2f}/{statistics.median(actions):.2f}/{actions[-1]:.2f}")
    print("\n  source: read the commit; init: Applier (targets, pool); observe: observe_live (includes the first")
    print("  SSH connect to each host); execute: Applier.execute; other: total not inside any timed call")
    print("  (thread start-up, the loader, idle between calls). db is nested inside facts and execute; channel")
    print("  (opening an SSH channel and starting `docker system dial-stdio`) inside the Docker calls.")

    endpoints = sorted({endpoint for r in results for endpoint, _ in r.recorder.requests})
    print("\nDocker API requests over SSH by endpoint: count x mean ms (max ms)\n")
    header = f"{'endpoint':<34}" + "".join(f"{f'{r.hosts} hosts':>22}" for r in results)
    print(header)
    print("-" * len(header))
    for endpoint in endpoints:
        cells = []
        for r in results:
            times = [t for e, t in r.recorder.requests if e == endpoint]
            cells.append(f"{len(times)} x {1000 * statistics.mean(times):.0f} ({1000 * max(times):.0f})"
                         if times else "-")
        print(f"{endpoint:<34}" + "".join(f"{cell:>22}" for cell in cells))


# -- setup and teardown --------------------------------------------------------------------------------


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 6], help="numbers of hosts (default 1 3 6)")
    parser.add_argument("--repeat", type=int, default=1, help="applies per size (each from scratch)")
    parser.add_argument("--parallel", type=int, default=8, help="Applier parallel (apply's default: 8)")
    parser.add_argument("--poll", type=float, default=1.0, help="Applier poll_s for readiness (default 1.0)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed 1-host apply first")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    testbed = importlib.import_module("testbed")
    signal.signal(signal.SIGTERM, _on_sigterm)
    bed = None
    results: list[Result] = []
    status = 0
    try:
        with throwaway_database() as url, tempfile.TemporaryDirectory(prefix="lmstack-bench-") as temp:
            database = open_database(Settings(database_url=url))
            try:
                config = testbed.BedConfig.from_env(hosts=max(args.sizes))
                print(f"starting the test bed with {config.hosts} hosts (waits while another run holds "
                      f"{config.state_dir}.lock)", file=sys.stderr)
                bed = testbed.TestBed.start(config)
                print("bed up: " + ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in bed.timings.items()),
                      file=sys.stderr)
                runs = [(1, True)] if not args.no_warmup else []
                runs += [(size, False) for size in args.sizes for _ in range(args.repeat)]
                for i, (size, warmup) in enumerate(runs):
                    result = run_once(bed, database, size, Path(temp) / f"run{i}", parallel=args.parallel,
                                      poll_s=args.poll)
                    print(f"{'warm-up ' if warmup else ''}{size} hosts: {result.total_s:.2f}s", file=sys.stderr)
                    if not warmup:
                        results.append(result)
                clean_containers(bed)
            finally:
                database.close()
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                if bed is not None:
                    problems = bed.close()
                    print("test bed removed" if not problems else "test bed NOT removed completely: "
                          + "; ".join(problems), file=sys.stderr)
                    status = 1 if problems else 0
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    if results:
        print_tables(results, parallel=args.parallel, poll_s=args.poll)
    return status


if __name__ == "__main__":
    sys.exit(main())
