"""`lmstack apply` as named phases: facts -> observe -> plan -> prune orphans -> delete -> create -> record.

The observe phase records at once what it sees gone or stopped (before anything is repaired), so the gateway
stops routing to it; `lmstack plan` runs the same observe phase on the stored facts and records nothing.
A pass is ok only when every replica was acted on or checked: a replica on a worker that is not Ready or
whose containers could not be listed, and a replica that cannot be placed, make it fail with the reason.

Deletes run before creates (their GPUs are free in the same plan). Creates and moves run in parallel
across workers with a bounded pool; the restarts of one deployment (its rollout: surges first, then restarts
in place) go in `rollout.maxUnavailable` chains, and stop when one of them fails.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lmstack.backends import EffectiveSpec, effective_spec
from lmstack.gitsource import Source
from lmstack.nodes.docker import DockerPool, DockerTarget
from lmstack.reconcile.access import WorkerAccess, worker_access
from lmstack.reconcile.backoff import CrashBackoff
from lmstack.reconcile.execute import ActionResult, Executor, Progress
from lmstack.reconcile.facts import FactsReport, gather_facts
from lmstack.reconcile.live import LiveView, Lost, observe_live, recorded_only
from lmstack.reconcile.model import Action, ActionKind, Observed, Plan
from lmstack.reconcile.observe import load_observed
from lmstack.reconcile.planner import plan as make_plan
from lmstack.reconcile.records import (
    add_event,
    finish_sync_run,
    record_deployments,
    record_lost,
    record_progress_ended,
    record_progress_started,
    record_worker_conditions,
    start_sync_run,
)
from lmstack.state import Database


@dataclass(frozen=True)
class Survey:
    """Everything known before anything changes: shown to the user, who then says yes or no."""

    facts: FactsReport | None  # None: not gathered now (`lmstack plan` plans on the stored facts)
    live: LiveView
    plan: Plan
    # where the plan's containers are made and what they mount, by worker
    workers: Mapping[str, WorkerAccess] = field(default_factory=dict)
    # worker -> why it is not Ready (its stored facts say so)
    not_ready: Mapping[str, str] = field(default_factory=dict)

    def unchecked(self) -> tuple[Problem, ...]:
        """The replicas this pass can neither check nor act on (their worker is not Ready or did not list its
        containers), and the replicas that cannot be placed: each is a reason the pass is not ok."""
        problems = []
        for action in self.plan.actions:
            worker = action.placement.worker if action.placement else None
            if action.kind is not ActionKind.NOOP or worker is None:
                continue
            why = self.not_ready.get(worker)
            what = f"worker {worker} is not Ready ({why})" if why is not None else None
            if what is None and worker in self.live.unreachable:
                what = f"its containers on {worker} could not be listed ({self.live.unreachable[worker]})"
            if what is not None:
                problems.append(Problem(action.deployment, action.replica, f"not checked or changed: {what}"))
        problems += [Problem(item.deployment, item.replica, f"unplaceable: {item.reason}")
                     for item in self.plan.unplaceable]
        return tuple(problems)


@dataclass(frozen=True)
class Problem:
    """A replica a pass could not act on, and why."""

    deployment: str
    replica: int
    reason: str

    def __str__(self) -> str:
        return f"{self.deployment}/{self.replica}: {self.reason}"


@dataclass(frozen=True)
class ApplyReport:
    plan: Plan
    results: tuple[ActionResult, ...]
    orphans_removed: int
    errors: tuple[str, ...]
    sync_run: int
    problems: tuple[Problem, ...] = ()  # replicas not acted on (worker down, unplaceable, backing off)
    retry_at: datetime | None = None  # the earliest a replica backing off may be tried again (backoff.py)

    @property
    def failed(self) -> tuple[ActionResult, ...]:
        return tuple(result for result in self.results if not result.ok)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.errors and not self.problems


class Applier:
    """One apply pass over a source, holding the Docker connections for the whole pass."""

    def __init__(self, source: Source, database: Database, *, ssh_key: Path, known_hosts: Path,
                 parallel: int = 8, environ: Mapping[str, str] | None = None, trigger: str = "cli",
                 poll_s: float = 1.0, ssh_config: Path | None = None, route_refresh_s: float = 1.0,
                 prune: bool = True) -> None:
        self.source = source
        self.prune = prune  # delete the replicas of deployments removed from the manifests
        self.database = database
        self.ssh_key = ssh_key
        self.known_hosts = known_hosts
        self.ssh_config = ssh_config
        self.parallel = parallel
        self.environ = dict(os.environ) if environ is None else environ
        self.trigger = trigger
        self.poll_s = poll_s
        self.route_refresh_s = route_refresh_s  # the gateway's settings.registry_refresh_s: see Executor
        self.workers = self._workers()
        self.pool = DockerPool(
            [DockerTarget(worker=name, url=access.docker_url) for name, access in self.workers.items()],
            ssh_key=ssh_key, known_hosts=known_hosts, ssh_config=ssh_config,
        )

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()

    # -- phases ------------------------------------------------------------------------------------

    def survey(self) -> Survey:
        """Facts, then observe (recording what is lost), then plan."""
        facts = gather_facts(self.source, self.database, ssh_key=self.ssh_key, known_hosts=self.known_hosts,
                             ssh_config=self.ssh_config)
        return self.observe(facts, record=True)

    def observe(self, facts: FactsReport | None = None, *, record: bool = False) -> Survey:
        """Observe the containers of every worker Ready by the stored facts (and of workers gone from the
        manifests), and plan. `record`: write the replicas seen gone or stopped to the database now."""
        with self.database.session() as session:
            stored = load_observed(session)
        workers = {name for name in self.source.desired.workers if name in self.workers}
        workers |= {replica.worker for replica in stored.replicas if replica.worker in self.workers}
        ready = {name for name, worker in stored.workers.items() if worker.ready}
        live = observe_live(stored, self.pool, sorted(w for w in workers if w in ready
                                                      or w not in self.source.desired.workers),
                            parallel=self.parallel)
        not_ready = _not_ready(stored, self.source.desired.workers)
        if record:
            self._record_lost(live.lost)
            self._record_workers(not_ready, live)
        return Survey(facts, live, make_plan(self.source.desired, live.observed, prune=self.prune), self.workers,
                      not_ready)

    def _record_workers(self, not_ready: Mapping[str, str], live: LiveView) -> None:
        lost: dict[str, list[str]] = defaultdict(list)
        for item in live.lost:
            lost[item.worker].append(f"{item.deployment}/{item.ordinal}: {item.message}")
        with self.database.session() as session:
            record_worker_conditions(session, not_ready=not_ready, unlisted=live.unreachable, lost=lost)

    def _record_lost(self, lost: tuple[Lost, ...]) -> None:
        with self.database.session() as session:
            for item in lost:
                if record_lost(session, deployment=item.deployment, ordinal=item.ordinal, recorded=item.recorded,
                               recorded_container=item.recorded_container, status=item.status,
                               message=item.message):
                    add_event(session, type="Warning", kind="Deployment", name=item.deployment,
                              reason="ReplicaLost", message=f"replica {item.ordinal}: {item.message}",
                              sync_run=None)

    def execute(self, survey: Survey, *, progress: Progress | None = None) -> ApplyReport:
        plan = survey.plan
        revision = self.source.revision
        specs = {name: effective_spec(name, deployment.spec)
                 for name, deployment in self.source.desired.deployments.items()}
        with self.database.session() as session:
            run_id = start_sync_run(session, revision=revision.sha if revision else None,
                                    subject=revision.subject if revision else None, source=self.source.origin,
                                    trigger=self.trigger, plan=plan.to_json())
        executor = Executor(
            pool=self.pool, database=self.database,
            workers=self.workers,
            specs=specs, revision=revision.sha if revision else None, sync_run=run_id, environ=self.environ,
            limits=self.source.limits, containers=survey.live.containers,
            progress=progress or (lambda action, status: None),
            poll_s=self.poll_s, route_refresh_s=self.route_refresh_s,
        )
        backoff = CrashBackoff(self.database, self.pool, specs=specs, environ=self.environ, limits=self.source.limits)
        backoff.note_lost(survey.live)  # before the actions remove the stopped containers
        errors: list[str] = []
        removed = 0
        for orphan in survey.live.orphans:
            error = executor.remove_orphan(orphan.worker, orphan.container_id, orphan.name)
            if error is None:
                removed += 1
            else:
                errors.append(error)
        results: list[ActionResult] = []
        changes, held = backoff.hold_back([action for action in plan.actions if action.kind is not ActionKind.NOOP])
        touched = _touched_workers(changes)
        if changes:
            with self.database.session() as session:
                record_progress_started(session, deployments=_rollouts(changes, revision.sha if revision else None),
                                        workers=touched)
        deletes = [action for action in changes if action.kind is ActionKind.DELETE]
        others = [action for action in changes if action.kind is not ActionKind.DELETE]
        with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as threads:
            results.extend(threads.map(executor.run, deletes))
            for chain_results in threads.map(executor.run_chain, _chains(others, specs)):
                results.extend(chain_results)
        backoff.after(results)
        problems = survey.unchecked() + tuple(Problem(h.deployment, h.replica, h.reason) for h in held)
        failed_by_deployment: dict[str, str] = {}
        for result in results:
            if not result.ok:
                failed_by_deployment.setdefault(result.action.deployment,
                                                f"replica {result.action.replica}: {result.message}")
        for problem in problems:
            failed_by_deployment.setdefault(problem.deployment, f"replica {problem.replica} {problem.reason}")
        report = ApplyReport(plan, tuple(results), removed, tuple(errors), run_id, problems, backoff.retry_at())
        with self.database.session() as session:
            record_deployments(
                session,
                specs=specs,
                failed=failed_by_deployment, revision=revision.sha if revision else None)
            record_progress_ended(session, list(touched))
            failures = [f"{r.action.replica_name}: {r.message}" for r in report.failed]
            finish_sync_run(session, run_id, ok=report.ok, result=_result_json(results, removed, errors, problems),
                            error=None if report.ok else "; ".join(failures + errors + [str(p) for p in problems]))
        return report

    # -- connection details --------------------------------------------------------------------------

    def _workers(self) -> dict[str, WorkerAccess]:
        with self.database.session() as session:
            return worker_access(self.source, session)


def _chains(actions: list[Action], specs: Mapping[str, EffectiveSpec]) -> list[list[Action]]:
    """Independent chains of work: each create or move alone; the restarts of one deployment (its rollout) in
    `rollout.maxUnavailable` chains (at least one), surges first: a surge keeps its old replica serving until
    the new one is Ready, a restart in place stops it first, so at most that many are down at once."""
    chains: list[list[Action]] = []
    rollouts: dict[str, list[Action]] = defaultdict(list)
    for action in actions:
        same_worker = (action.kind is ActionKind.RECREATE and action.previous is not None
                       and action.placement is not None and action.previous.worker == action.placement.worker)
        if same_worker or (action.kind is ActionKind.RECREATE and action.surge is not None):
            rollouts[action.deployment].append(action)
        else:
            chains.append([action])
    for name, group in rollouts.items():
        spec = specs.get(name)
        lanes: list[list[Action]] = [[] for _ in range(max(1, spec.rollout.max_unavailable if spec else 1))]
        lanes[0] += [action for action in group if action.surge is not None]
        for index, action in enumerate(action for action in group if action.surge is None):
            lanes[index % len(lanes)].append(action)
        chains += [lane for lane in lanes if lane]
    return chains


def _rollouts(changes: list[Action], revision: str | None) -> dict[str, str]:
    """Deployment -> what the pass does to it ("applying 3f2a9c1e0b7d: recreate chat/0, create chat/1")."""
    done: dict[str, list[str]] = defaultdict(list)
    for action in changes:
        done[action.deployment].append(f"{action.kind.value} {action.replica_name}")
    applying = f"applying {revision[:12]}" if revision else "applying"
    return {name: f"{applying}: {', '.join(items)}" for name, items in done.items()}


def _touched_workers(changes: list[Action]) -> dict[str, list[str]]:
    """Worker -> the replicas the pass creates, replaces or removes on it."""
    touched: dict[str, list[str]] = defaultdict(list)
    for action in changes:
        for place in {p.worker for p in (action.placement, action.previous) if p is not None}:
            touched[place].append(action.replica_name)
    return dict(touched)


def _not_ready(stored: Observed, desired: Mapping[str, object]) -> dict[str, str]:
    """Each desired worker that the stored facts do not call Ready, and why."""
    reasons = {}
    for name in desired:
        worker = stored.workers.get(name)
        if worker is None or not worker.facts_known:
            reasons[name] = "facts not gathered"
        elif not worker.ready:
            reasons[name] = worker.reason or "no reason given"
    return reasons


def _result_json(results: list[ActionResult], removed: int, errors: list[str],
                 problems: tuple[Problem, ...]) -> dict[str, Any]:
    return {
        "actions": [{"kind": r.action.kind.value, "replica": r.action.replica_name, "ok": r.ok,
                     "message": r.message, "endpoint": r.endpoint, "seconds": round(r.elapsed_s, 2),
                     "retryable": r.retryable}
                    for r in results],
        "orphansRemoved": removed,
        "errors": errors,
        "notActedOn": [{"replica": f"{p.deployment}/{p.replica}", "reason": p.reason} for p in problems],
    }


def apply_source(source: Source, database: Database, *, ssh_key: Path, known_hosts: Path,
                 confirm: Callable[[Survey], bool] = lambda survey: True, progress: Progress | None = None,
                 parallel: int = 8, ssh_config: Path | None = None,
                 route_refresh_s: float = 1.0, prune: bool = True) -> tuple[Survey, ApplyReport | None]:
    """Plan, ask (only when there is something to change), and apply. Returns the report, or None when the
    user said no. A pass with nothing to change is still recorded: the revision is then the one in sync.
    `route_refresh_s`: how often the gateway re-reads its replicas (a replica is drained at least that long).
    `prune`: delete the replicas of deployments removed from the manifests."""
    with Applier(source, database, ssh_key=ssh_key, known_hosts=known_hosts, parallel=parallel,
                 ssh_config=ssh_config, route_refresh_s=route_refresh_s, prune=prune) as applier:
        survey = applier.survey()
        if (survey.plan.has_changes or survey.live.orphans) and not confirm(survey):
            return survey, None
        return survey, applier.execute(survey, progress=progress)


def plan_source(source: Source, database: Database, *, ssh_key: Path | None, known_hosts: Path | None,
                ssh_config: Path | None = None, parallel: int = 8, prune: bool = True) -> Survey:
    """What `apply` would do now, on the stored facts: the containers observed over SSH as apply's observe
    phase does (nothing is recorded or changed), or, without `ssh_key` and `known_hosts`, the recorded
    state as it is (`Survey.live.observed_live` False)."""
    if ssh_key is None or known_hosts is None:
        with database.session() as session:
            stored = load_observed(session)
            workers = worker_access(source, session)
        return Survey(None, recorded_only(stored), make_plan(source.desired, stored, prune=prune), workers,
                      _not_ready(stored, source.desired.workers))
    with Applier(source, database, ssh_key=ssh_key, known_hosts=known_hosts, parallel=parallel,
                 ssh_config=ssh_config, prune=prune) as applier:
        return applier.observe()
