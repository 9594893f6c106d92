"""One controller pass: read the ref, take the leader lock (or leave the pass to whoever holds it), plan
against what runs on the workers, apply, and say in one line what happened.

Level-based: a pass never looks at what woke it (beyond naming it in the sync run) but at the commit the ref
names now and at the containers themselves. What it does not apply:
- a poll that finds the commit last applied (a drift pass re-observes instead);
- a pass with nothing to change at the commit last applied, every replica checked (not recorded: a drift
  pass every 15 s would otherwise add a sync run every 15 s; a worker that is down is recorded, and its
  failed passes back off);
- a commit whose manifests are invalid: recorded once as a failed sync run with every error, then left until
  a new commit (retrying cannot fix it).
Raises whatever stops the pass (repository unreachable, database down, facts failing): the loop retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from lmstack.config import Settings, SshFiles
from lmstack.gitsource import parse_snapshot, read_commit
from lmstack.gitsource.source import push_limits
from lmstack.manifests import ManifestValidationError
from lmstack.reconcile.apply import Applier, ApplyReport
from lmstack.reconcile.leader import current_holder, try_lead
from lmstack.reconcile.model import ActionKind
from lmstack.reconcile.records import finish_sync_run, last_applied_run, start_sync_run
from lmstack.state import Database

log = logging.getLogger("lmstack.controller")

Outcome = Literal["applied", "failed", "unchanged", "skipped", "invalid"]


@dataclass(frozen=True)
class PassResult:
    trigger: str
    outcome: Outcome
    revision: str | None
    summary: str  # the one line logged
    sync_run: int | None = None
    observed: bool = False  # the containers were listed (a drift check happened)
    retry_at: datetime | None = None  # the earliest a replica backing off may be tried again (reconcile/backoff.py)

    @property
    def ok(self) -> bool:
        """False: retry after a delay (a replica failed)."""
        return self.outcome != "failed"


class PassRunner:
    def __init__(self, settings: Settings, database: Database, ssh: SshFiles, *, parallel: int = 8,
                 environ: Mapping[str, str] | None = None) -> None:
        if settings.repo is None:
            raise ValueError("the controller needs a repository (LMSTACK_REPO)")
        self.settings = settings
        self.repo = settings.repo
        self.database = database
        self.ssh = ssh
        self.parallel = parallel
        self.environ = environ
        self._invalid: str | None = None  # the commit last found invalid (recorded once)
        self._facts_at: float | None = None  # when this runner last gathered facts (monotonic), and of whom
        self._facts_workers: frozenset[str] = frozenset()

    def run(self, trigger: str) -> PassResult:
        started = time.monotonic()
        snapshot = read_commit(self.repo, self.settings.ref, cache_dir=self.settings.repo_cache_dir)
        sha = snapshot.revision.sha if snapshot.revision is not None else None
        short = (sha or "?")[:12]
        if sha is not None and sha == self._invalid and trigger in ("poll", "drift"):
            return PassResult(trigger, "invalid", sha, f"{trigger} {short}: manifests invalid (see the sync run)")
        with try_lead(self.database, role="serve") as leadership:
            if leadership is None:
                holder = current_holder(self.database)
                return PassResult(trigger, "skipped", sha, f"{trigger} {short}: skipped, "
                                                           f"{holder or 'another process'} applies")
            if leadership.interrupted_runs:
                log.warning("sync runs %s were left running by a process that stopped: marked interrupted",
                            ", ".join(map(str, leadership.interrupted_runs)))
            applied = self._last_applied()
            if trigger == "poll" and sha == applied:
                return PassResult(trigger, "unchanged", sha, f"poll {short}: no new commit")
            try:
                source = parse_snapshot(snapshot, limits=push_limits(self.settings))
            except ManifestValidationError as exc:
                return self._invalid_commit(trigger, snapshot.origin, sha, exc)
            self._invalid = None
            with Applier(source, self.database, ssh_key=self.ssh.key, known_hosts=self.ssh.known_hosts,
                         ssh_config=self.ssh.config, parallel=self.parallel, trigger=trigger,
                         environ=self.environ, route_refresh_s=self.settings.registry_refresh_s,
                         prune=self.settings.prune) as applier:
                workers = frozenset(source.desired.workers)
                if self._facts_due(workers):
                    survey = applier.survey()
                    self._facts_at, self._facts_workers = time.monotonic(), workers
                else:
                    survey = applier.observe(record=True)
                # Nothing to do and nothing unchecked (a worker down is recorded: its deployments go Degraded).
                settled = not (survey.plan.has_changes or survey.live.orphans or survey.unchecked())
                if settled and sha == applied:
                    return PassResult(trigger, "unchanged", sha, f"{trigger} {short}: no changes "
                                                                 f"({time.monotonic() - started:.1f} s)",
                                      observed=True)
                report = applier.execute(survey)
        return PassResult(trigger, "applied" if report.ok else "failed", sha,
                          f"{trigger} {short}: {_counts(report)} ({time.monotonic() - started:.1f} s, "
                          f"sync run {report.sync_run})", report.sync_run, observed=True, retry_at=report.retry_at)

    def _facts_due(self, workers: frozenset[str]) -> bool:
        """Whether this pass gathers facts: every `facts_interval_s`, and whenever the commit names a worker the
        last gathering did not (it has no facts yet). Gathering is most of a pass (Ansible on every worker,
        ~2.5 s on 3 test hosts); containers are listed on every pass regardless, so drift is still seen."""
        return (self._facts_at is None or time.monotonic() - self._facts_at >= self.settings.facts_interval_s
                or not workers <= self._facts_workers)

    def _last_applied(self) -> str | None:
        """The revision of the newest succeeded sync run: what the fleet was last made to match."""
        with self.database.session() as session:
            run = last_applied_run(session)
            return run.revision if run is not None else None

    def _invalid_commit(self, trigger: str, origin: str, sha: str | None,
                        error: ManifestValidationError) -> PassResult:
        run_id = None
        if sha is None or sha != self._invalid:
            self._invalid = sha
            with self.database.session() as session:
                run_id = start_sync_run(session, revision=sha, subject=None, source=origin, trigger=trigger, plan={})
                finish_sync_run(session, run_id, ok=False, result={"errors": [str(e) for e in error.errors]},
                                error=f"invalid manifests, nothing applied: {error}")
        return PassResult(trigger, "invalid", sha, f"{trigger} {(sha or '?')[:12]}: manifests invalid, nothing "
                                                   f"applied: {len(error.errors)} errors", run_id)


def _counts(report: ApplyReport) -> str:
    done = {kind: sum(1 for r in report.results if r.ok and r.action.kind is kind) for kind in ActionKind}
    return (f"{done[ActionKind.CREATE]} created, {done[ActionKind.RECREATE]} recreated, "
            f"{done[ActionKind.UPDATE]} updated, {done[ActionKind.DELETE]} deleted, "
            f"{report.orphans_removed} orphans removed, {len(report.failed)} failed")
