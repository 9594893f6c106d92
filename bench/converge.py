"""How long the controller takes from a push to a Ready replica, through the webhook and through polling, and
how long a pass with nothing to change takes.

    .venv/bin/python bench/converge.py                     # 3 pushes each way, poll interval 2 s
    .venv/bin/python bench/converge.py --repeat 5 --poll-interval 1

Needs root and what the multi-host test bed needs (tests/testbed/bed.py), and a PostgreSQL on 127.0.0.1:5432
with trust auth for user postgres (LMSTACK_TEST_POSTGRES overrides the admin URL); a throwaway database and
the bed are removed at the end. The server is the real app (uvicorn in a thread) with its controller; the
repository is a bare remote served as a file:// URL (no watcher: only the trigger measured acts).

Each push adds a deployment of the stand-in engine (1 replica, `gpus: 0`). commit-to-Ready runs from the end
of `git push` to the sync run finished (its replica is Ready by then). "container" is the create action's own
time (create, start, engine ready: the part the engine decides); "controller" is the rest (fetch, facts,
observe, plan, records), of which "facts" is the Ansible facts run every pass makes. Medians; figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql
from sqlalchemy import select
from sqlalchemy.engine import make_url

from lmstack.api.app import create_app
from lmstack.config import Settings, SshFiles
from lmstack.controller import PassRunner, build_controller
from lmstack.reconcile import apply as apply_module
from lmstack.state import Database, SyncRun, open_database

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def throwaway_database() -> Iterator[str]:
    admin = make_url(os.environ.get("LMSTACK_TEST_POSTGRES", DEFAULT_ADMIN_URL))
    admin_dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"lmstack_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield admin.set(drivername="postgresql", database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def facts_timer() -> Iterator[list[float]]:
    """Seconds of every facts run while inside (Applier.prepare calls apply.gather_facts)."""
    seconds: list[float] = []
    original: Callable[..., Any] = apply_module.gather_facts

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.monotonic() - started)

    apply_module.gather_facts = timed  # type: ignore[assignment]
    try:
        yield seconds
    finally:
        apply_module.gather_facts = original  # type: ignore[assignment]


def finished_run(database: Database, sha: str, timeout_s: float = 180) -> SyncRun:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with database.session() as session:
            run = session.scalars(select(SyncRun).where(SyncRun.revision == sha, SyncRun.finished_at.is_not(None))
                                  ).first()
        if run is not None:
            if run.status != "succeeded":
                raise RuntimeError(f"sync run {run.id} for {sha[:12]}: {run.status}: {run.error}")
            return run
        time.sleep(0.02)
    raise RuntimeError(f"no finished sync run for {sha[:12]} within {timeout_s:.0f} s")


def measure(remote: Any, database: Database, name: str, send: Callable[[str], None]) -> dict[str, float]:
    with facts_timer() as facts:
        sha = remote.push(name, replicas=1)
        pushed = time.time()
        send(sha)
        run = finished_run(database, sha)
    assert run.finished_at is not None and run.result is not None
    total = run.finished_at.timestamp() - pushed
    container = sum(action["seconds"] for action in run.result["actions"])
    return {"total": total, "container": container, "controller": total - container,
            "facts": facts[-1] if facts else 0.0, "detect": run.started_at.timestamp() - pushed}


def report(label: str, figures: list[dict[str, float]]) -> None:
    def median(key: str) -> float:
        return statistics.median(f[key] for f in figures)

    print(f"{label:<28} commit-to-Ready {median('total'):6.2f} s   container {median('container'):5.2f} s   "
          f"controller {median('controller'):5.2f} s (facts {median('facts'):4.2f} s)   "
          f"push-to-sync-run-start {median('detect'):5.2f} s   [median of {len(figures)}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="pushes per trigger (default 3)")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="LMSTACK_POLL_INTERVAL_S for the poll runs")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    testbed = importlib.import_module("testbed")
    gitops = importlib.import_module("gitops")
    apiserver = importlib.import_module("apiserver")
    bed = testbed.TestBed.start(testbed.BedConfig.from_env())
    try:
        with throwaway_database() as url, tempfile.TemporaryDirectory(prefix="lmstack-bench-") as temp:
            database = open_database(Settings(database_url=url))
            try:
                remote = gitops.Remote(Path(temp), bed, bed.standin_image)
                run_webhook(args, remote, database, url, apiserver, gitops)
                run_poll(args, remote, database, url)
                run_no_change(remote, database, url)
            finally:
                database.close()
    finally:
        problems = bed.close()
        if problems:
            print("test bed NOT removed completely: " + "; ".join(problems), file=sys.stderr)
    return 0


def run_webhook(args: argparse.Namespace, remote: Any, database: Database, url: str, apiserver: Any,
                gitops: Any) -> None:
    settings = remote.settings(url, webhook_secret=gitops.HOOK_SECRET)
    controller = build_controller(settings, database, watch=False)
    assert controller is not None
    with apiserver.LiveServer(create_app(settings, database=database, controller=controller), settings) as server:
        assert controller.wait_idle(passes=1, timeout_s=120)  # the pass at start

        def send(sha: str) -> None:
            body = json.dumps({"ref": "refs/heads/main", "after": sha}).encode()
            answer = httpx.post(f"{server.url}/api/hooks/git", content=body, headers=gitops.github_signature(body))
            answer.raise_for_status()

        figures = [measure(remote, database, f"hook{i}", send) for i in range(args.repeat)]
    report("webhook", figures)


def run_poll(args: argparse.Namespace, remote: Any, database: Database, url: str) -> None:
    settings = remote.settings(url, poll_interval_s=args.poll_interval)
    controller = build_controller(settings, database, watch=False)
    assert controller is not None
    controller.start()
    try:
        assert controller.wait_idle(passes=1, timeout_s=120)
        figures = [measure(remote, database, f"poll{i}", lambda sha: None) for i in range(args.repeat)]
    finally:
        controller.stop()
    report(f"poll (every {args.poll_interval:g} s)", figures)


def run_no_change(remote: Any, database: Database, url: str) -> None:
    ssh = SshFiles(key=remote.bed.ssh_key, known_hosts=remote.bed.known_hosts, config=None)
    runner = PassRunner(remote.settings(url), database, ssh)
    seconds, facts_s = [], []
    for _ in range(3):
        with facts_timer() as facts:
            started = time.monotonic()
            result = runner.run("drift")
            seconds.append(time.monotonic() - started)
        assert result.outcome == "unchanged", result.summary
        facts_s.append(facts[-1])
    deployments = len(remote.containers())
    print(f"{'no-change pass':<28} {statistics.median(seconds):6.2f} s   (facts {statistics.median(facts_s):4.2f} s; "
          f"{deployments} deployments on {len(remote.bed.hosts)} hosts)   [median of 3]")


if __name__ == "__main__":
    sys.exit(main())
