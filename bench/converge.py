"""How long the controller takes from a push to a Ready replica, through the webhook and through polling, how
long a pass with nothing to change takes, how long drift repair takes, and a no-change pass at scale.

    .venv/bin/python bench/converge.py                     # 3 pushes each way, poll interval 2 s
    .venv/bin/python bench/converge.py --repeat 5 --poll-interval 1
    .venv/bin/python bench/converge.py --stages drift,scale --deployments 100 --hosts 6

Needs root and what the multi-host test bed needs (tests/testbed/bed.py), and a PostgreSQL on 127.0.0.1:5432
with trust auth for user postgres (LMSTACK_TEST_POSTGRES overrides the admin URL); a throwaway database and
the bed are removed at the end. The server is the real app (uvicorn in a thread) with its controller; the
repository is a bare remote served as a file:// URL (no watcher: only the trigger measured acts).

Each push adds a deployment of the stand-in engine (1 replica, `gpus: 0`). commit-to-Ready runs from the end
of `git push` to the sync run finished (its replica is Ready by then). "container" is the create action's own
time (create, start, engine ready: the part the engine decides); "controller" is the rest (fetch, facts,
observe, plan, records), of which "facts" is the Ansible facts run every pass makes. Medians; figures only.

drift: `docker rm -f` of a managed container while the controller runs with a short drift interval: seconds to
the pass that noticed it (the replica recorded missing) and to Ready again (the new container's own start
shown apart). scale: `--deployments` one-replica stand-in deployments (`gpus: 0`) on `--hosts` hosts, applied in
one commit (that apply is timed too), then passes with nothing to change, with and without a facts run. The
bed has `--hosts` hosts (default 6; LMSTACK_TESTBED_HOSTS when larger).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from benchdb import throwaway_database
from sqlalchemy import select

from lmstack.api.app import create_app
from lmstack.config import Settings, SshFiles
from lmstack.controller import PassRunner, build_controller
from lmstack.reconcile import apply as apply_module
from lmstack.state import Database, Event, Replica, SyncRun, open_database

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("webhook", "poll", "no-change", "drift", "scale")


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
    parser.add_argument("--drift-interval", type=float, default=1.0, help="LMSTACK_DRIFT_INTERVAL_S for the drift runs")
    parser.add_argument("--deployments", type=int, default=100, help="deployments for the scale run (default 100)")
    parser.add_argument("--hosts", type=int, default=6, help="test bed hosts (default 6)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"which to run, comma-separated (default all: {','.join(STAGES)})")
    args = parser.parse_args()
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {', '.join(unknown)}; choose from {', '.join(STAGES)}")

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    testbed = importlib.import_module("testbed")
    gitops = importlib.import_module("gitops")
    apiserver = importlib.import_module("apiserver")
    config = testbed.BedConfig.from_env()
    bed = testbed.TestBed.start(testbed.BedConfig.from_env(hosts=max(config.hosts, args.hosts)))
    try:
        with throwaway_database() as url, tempfile.TemporaryDirectory(prefix="lmstack-bench-") as temp:
            database = open_database(Settings(database_url=url))
            try:
                remote = gitops.Remote(Path(temp), bed, bed.standin_image)
                if "webhook" in stages:
                    run_webhook(args, remote, database, url, apiserver, gitops)
                if "poll" in stages:
                    run_poll(args, remote, database, url)
                if "no-change" in stages:
                    run_no_change(remote, database, url)
                if "drift" in stages:
                    run_drift(args, remote, database, url)
                if "scale" in stages:
                    run_scale(args, remote, database, url, gitops)
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
        facts_s.append(facts[-1] if facts else 0.0)  # passes between fact gatherings (facts_interval_s) run none
    deployments = len(remote.containers())
    print(f"{'no-change pass':<28} {statistics.median(seconds):6.2f} s   (facts {statistics.median(facts_s):4.2f} s; "
          f"{deployments} deployments on {len(remote.bed.hosts)} hosts)   [median of 3]")


def run_drift(args: argparse.Namespace, remote: Any, database: Database, url: str) -> None:
    """`docker rm -f` the container of a Ready replica, `--repeat` times, the controller running: seconds to the
    pass that noticed (its ReplicaLost event) and to Ready again (the new container recorded ready)."""
    settings = remote.settings(url, drift_interval_s=args.drift_interval, facts_interval_s=3600)
    controller = build_controller(settings, database, watch=False)
    assert controller is not None
    figures: list[dict[str, float]] = []
    controller.start()
    try:
        remote.push("drift", replicas=1)
        controller.poke("webhook")
        ready = wait_ready(database, "drift")
        for _ in range(args.repeat):
            host = remote.containers()["drift/0"]
            removed = time.time()
            remote.bed.docker(host, "rm", "-f", ready.container_id)
            ready = wait_ready(database, "drift", other_than=ready.container_id)
            with database.session() as session:
                noticed = session.scalars(select(Event).where(Event.reason == "ReplicaLost")
                                          .order_by(Event.id.desc()).limit(1)).one()
            run = finished_since(database, removed)  # the repair's sync run, once it is recorded finished
            container = sum(action["seconds"] for action in (run.result or {}).get("actions", []))
            figures.append({"noticed": noticed.at.timestamp() - removed,
                            "ready": ready.updated_at.timestamp() - removed, "container": container})
    finally:
        controller.stop()

    def median(key: str) -> float:
        return statistics.median(f[key] for f in figures)

    print(f"{f'drift repair (every {args.drift_interval:g} s)':<28} rm-to-Ready {median('ready'):6.2f} s   "
          f"rm-to-noticed {median('noticed'):5.2f} s   container {median('container'):5.2f} s   "
          f"[median of {len(figures)}]")


def finished_since(database: Database, since: float, timeout_s: float = 60) -> SyncRun:
    """The first sync run started after `since` (unix time), once it has finished."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with database.session() as session:
            run = session.scalars(select(SyncRun).where(SyncRun.started_at >= datetime.fromtimestamp(since, UTC))
                                  .order_by(SyncRun.id).limit(1)).one_or_none()
        if run is not None and run.finished_at is not None:
            return run
        time.sleep(0.02)
    raise RuntimeError(f"no sync run finished within {timeout_s:.0f} s")


def wait_ready(database: Database, deployment: str, *, other_than: str | None = None,
               timeout_s: float = 120) -> Replica:
    """The deployment's replica 0 once it is ready (in a container other than `other_than`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with database.session() as session:
            row = session.scalars(select(Replica).where(Replica.deployment_name == deployment,
                                                        Replica.ordinal == 0)).one_or_none()
        if row is not None and row.status == "ready" and row.container_id != other_than:
            return row
        time.sleep(0.02)
    raise RuntimeError(f"{deployment}/0 not ready within {timeout_s:.0f} s")


def run_scale(args: argparse.Namespace, remote: Any, database: Database, url: str, gitops: Any) -> None:
    """`--deployments` deployments in one commit, applied by one pass; then no-change passes."""
    ssh = SshFiles(key=remote.bed.ssh_key, known_hosts=remote.bed.known_hosts, config=None)
    manifests = remote.work / "manifests"
    for index in range(args.deployments):
        (manifests / f"scale{index:03d}.yaml").write_text(
            gitops.deployment_yaml(f"scale{index:03d}", replicas=1, image=remote.image))
    gitops.git("add", "-A", cwd=remote.work)
    gitops.git("commit", "-qm", f"{args.deployments} deployments", cwd=remote.work)
    gitops.git("push", "-q", "origin", "main", cwd=remote.work)
    runner = PassRunner(remote.settings(url, facts_interval_s=3600), database, ssh, parallel=16)
    started = time.monotonic()
    applied = runner.run("webhook")
    apply_s = time.monotonic() - started
    if applied.outcome != "applied":
        raise RuntimeError(f"the scale commit was not applied: {applied.summary}")
    running = len(remote.containers())
    hosts = len(remote.bed.hosts)
    print(f"{'scale apply':<28} {apply_s:6.2f} s   ({args.deployments} deployments created on {hosts} hosts, "
          f"{running} containers running in all)")
    for label, facts_interval in (("without facts", 3600.0), ("with facts", 0.0)):
        runner.settings = remote.settings(url, facts_interval_s=facts_interval)
        seconds = []
        for _ in range(3):
            began = time.monotonic()
            result = runner.run("drift")
            seconds.append(time.monotonic() - began)
            if result.outcome != "unchanged":
                raise RuntimeError(f"a no-change pass changed something: {result.summary}")
        print(f"{f'no-change pass, {label}':<28} {statistics.median(seconds):6.2f} s   ({running} containers, "
              f"{hosts} hosts)   [median of 3]")


if __name__ == "__main__":
    sys.exit(main())
