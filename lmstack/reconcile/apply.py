"""`lmstack apply` as named phases: facts -> observe -> plan -> prune orphans -> delete -> create -> record.

Deletes run before creates (their GPUs are free in the same plan). Creates and moves run in parallel
across workers with a bounded pool; recreating replicas of one deployment in place goes one at a time,
so a deployment with several replicas keeps serving while it rolls.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmstack.backends import effective_spec
from lmstack.gitsource import Source
from lmstack.nodes.docker import DockerPool, DockerTarget
from lmstack.reconcile.execute import ActionResult, Executor, Progress, WorkerTarget
from lmstack.reconcile.facts import FactsReport, gather_facts
from lmstack.reconcile.live import LiveView, observe_live
from lmstack.reconcile.model import Action, ActionKind, Plan
from lmstack.reconcile.observe import load_observed
from lmstack.reconcile.planner import plan as make_plan
from lmstack.reconcile.records import finish_sync_run, record_deployments, start_sync_run
from lmstack.reconcile.targets import worker_targets
from lmstack.state import Database


@dataclass(frozen=True)
class Prepared:
    """Everything known before anything changes: shown to the user, who then says yes or no."""

    facts: FactsReport
    live: LiveView
    plan: Plan
    # worker -> (its Docker endpoint, its target): where the plan's containers are made and what they mount
    targets: Mapping[str, tuple[str, WorkerTarget]] = field(default_factory=dict)


@dataclass(frozen=True)
class ApplyReport:
    plan: Plan
    results: tuple[ActionResult, ...]
    orphans_removed: int
    errors: tuple[str, ...]
    sync_run: int

    @property
    def failed(self) -> tuple[ActionResult, ...]:
        return tuple(result for result in self.results if not result.ok)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.errors


class Applier:
    """One apply pass over a source, holding the Docker connections for the whole pass."""

    def __init__(self, source: Source, database: Database, *, ssh_key: Path, known_hosts: Path,
                 parallel: int = 8, environ: Mapping[str, str] | None = None, trigger: str = "cli",
                 poll_s: float = 1.0, ssh_config: Path | None = None) -> None:
        self.source = source
        self.database = database
        self.ssh_key = ssh_key
        self.known_hosts = known_hosts
        self.ssh_config = ssh_config
        self.parallel = parallel
        self.environ = dict(os.environ) if environ is None else environ
        self.trigger = trigger
        self.poll_s = poll_s
        self.targets = self._targets()
        self.pool = DockerPool(
            [DockerTarget(worker=name, url=url) for name, (url, _target) in self.targets.items()],
            ssh_key=ssh_key, known_hosts=known_hosts, ssh_config=ssh_config,
        )

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.close()

    # -- phases ------------------------------------------------------------------------------------

    def prepare(self) -> Prepared:
        facts = gather_facts(self.source, self.database, ssh_key=self.ssh_key, known_hosts=self.known_hosts,
                             ssh_config=self.ssh_config)
        with self.database.session() as session:
            stored = load_observed(session)
        workers = {name for name in self.source.desired.workers if name in self.targets}
        workers |= {replica.worker for replica in stored.replicas if replica.worker in self.targets}
        ready = {w.worker for w in facts.workers if w.ready}
        live = observe_live(stored, self.pool, sorted(w for w in workers if w in ready
                                                      or w not in self.source.desired.workers),
                            parallel=self.parallel)
        return Prepared(facts, live, make_plan(self.source.desired, live.observed), self.targets)

    def execute(self, prepared: Prepared, *, progress: Progress | None = None) -> ApplyReport:
        plan = prepared.plan
        revision = self.source.revision
        specs = {name: effective_spec(name, deployment.spec)
                 for name, deployment in self.source.desired.deployments.items()}
        with self.database.session() as session:
            run_id = start_sync_run(session, revision=revision.sha if revision else None,
                                    subject=revision.subject if revision else None, source=self.source.origin,
                                    trigger=self.trigger, plan=plan.to_json())
        executor = Executor(
            pool=self.pool, database=self.database,
            targets={name: target for name, (_url, target) in self.targets.items()},
            specs=specs, revision=revision.sha if revision else None, sync_run=run_id, environ=self.environ,
            limits=self.source.limits, containers=prepared.live.containers,
            progress=progress or (lambda action, status: None),
            poll_s=self.poll_s,
        )
        errors: list[str] = []
        removed = 0
        for orphan in prepared.live.orphans:
            error = executor.remove_orphan(orphan.worker, orphan.container_id, orphan.name)
            if error is None:
                removed += 1
            else:
                errors.append(error)
        results: list[ActionResult] = []
        changes = [action for action in plan.actions if action.kind is not ActionKind.NOOP]
        deletes = [action for action in changes if action.kind is ActionKind.DELETE]
        others = [action for action in changes if action.kind is not ActionKind.DELETE]
        with ThreadPoolExecutor(max_workers=max(1, self.parallel)) as threads:
            results.extend(threads.map(executor.run, deletes))
            for chain_results in threads.map(lambda chain: [executor.run(a) for a in chain], _chains(others)):
                results.extend(chain_results)
        failed_by_deployment: dict[str, str] = {}
        for result in results:
            if not result.ok:
                failed_by_deployment.setdefault(result.action.deployment, result.message)
        for item in plan.unplaceable:
            failed_by_deployment.setdefault(item.deployment, f"replica {item.replica} unplaceable: {item.reason}")
        with self.database.session() as session:
            record_deployments(
                session,
                specs=specs,
                failed=failed_by_deployment, revision=revision.sha if revision else None)
            ok = not any(not result.ok for result in results) and not errors
            finish_sync_run(session, run_id, ok=ok, result=_result_json(results, removed, errors),
                            error=None if ok else "; ".join([r.message for r in results if not r.ok] + errors))
        return ApplyReport(plan, tuple(results), removed, tuple(errors), run_id)

    # -- connection details --------------------------------------------------------------------------

    def _targets(self) -> dict[str, tuple[str, WorkerTarget]]:
        with self.database.session() as session:
            return worker_targets(self.source, session)


def _chains(actions: list[Action]) -> list[list[Action]]:
    """Independent chains of work: each create or move alone; in-place recreates of one deployment in a
    row (one replica of it down at a time)."""
    chains: list[list[Action]] = []
    in_place: dict[str, list[Action]] = defaultdict(list)
    for action in actions:
        same_worker = (action.kind is ActionKind.RECREATE and action.previous is not None
                       and action.placement is not None and action.previous.worker == action.placement.worker)
        if same_worker:
            in_place[action.deployment].append(action)
        else:
            chains.append([action])
    chains.extend(in_place.values())
    return chains


def _result_json(results: list[ActionResult], removed: int, errors: list[str]) -> dict[str, Any]:
    return {
        "actions": [{"kind": r.action.kind.value, "replica": r.action.replica_name, "ok": r.ok,
                     "message": r.message, "endpoint": r.endpoint, "seconds": round(r.elapsed_s, 2)}
                    for r in results],
        "orphansRemoved": removed,
        "errors": errors,
    }


def apply_source(source: Source, database: Database, *, ssh_key: Path, known_hosts: Path,
                 confirm: Callable[[Prepared], bool] = lambda prepared: True, progress: Progress | None = None,
                 parallel: int = 8, ssh_config: Path | None = None) -> tuple[Prepared, ApplyReport | None]:
    """Plan, ask (only when there is something to change), and apply. Returns the report, or None when the
    user said no. A pass with nothing to change is still recorded: the revision is then the one in sync."""
    with Applier(source, database, ssh_key=ssh_key, known_hosts=known_hosts, parallel=parallel,
                 ssh_config=ssh_config) as applier:
        prepared = applier.prepare()
        if (prepared.plan.has_changes or prepared.live.orphans) and not confirm(prepared):
            return prepared, None
        return prepared, applier.execute(prepared, progress=progress)
