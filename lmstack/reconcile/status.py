"""Where the fleet stands, read from the database: one word per deployment, and the sync state of the whole.

Shared by `lmstack status` and the status API (/api/sync), so both say the same. A deployment is:

- Degraded: the last pass failed on it (its Degraded condition, whose reason leads: CrashLoopBackOff with the
  exit code, until when it backs off and the last log lines, or ActionFailed) or a replica is recorded failed
  or missing;
- Progressing: a pass is applying a change to it (its RolloutInProgress condition), a replica is pending,
  starting, draining or being deleted, or fewer are ready than its spec asks for;
- OutOfSync: the commit's spec of it differs from the one last applied (without the commit's specs: the
  commit is not the one it was last applied from), it is in the commit but was never applied, or it was
  removed from the commit and is still running;
- Synced: otherwise.

The first that holds wins: a broken replica matters more than a new commit waiting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from lmstack.backends import normalize_applied
from lmstack.reconcile.records import last_applied_run
from lmstack.state.models import Deployment, Replica, SyncRun

SyncState = Literal["Synced", "OutOfSync", "Unknown"]
DeploymentState = Literal["Synced", "OutOfSync", "Progressing", "Degraded"]

_BROKEN = frozenset({"failed", "missing"})
_UNSETTLED = frozenset({"pending", "starting", "draining", "deleting"})


def compare_revisions(head: str, applied: str | None, *, latest_revision: str | None = None,
                      latest_status: str | None = None, latest_error: str | None = None) -> tuple[SyncState, str]:
    """Synced when `applied` (the revision of the last succeeded sync run) is `head`; the message says why
    not, with the latest run when it was on `head`."""
    if applied == head:
        return "Synced", f"{head[:12]} is applied"
    message = f"{head[:12]} is not applied yet" + (f" (the last applied is {applied[:12]})" if applied else
                                                    " (nothing was applied yet)")
    if latest_revision == head and latest_status not in (None, "succeeded"):
        message += ("; a sync run on it is under way" if latest_status == "running"
                    else f"; the last sync run on it failed: {latest_error or 'see its events'}")
    return "OutOfSync", message


@dataclass(frozen=True)
class ReplicaLine:
    name: str
    worker: str
    status: str
    message: str | None
    revision: str | None
    crash_count: int = 0  # failures in a row (crash-loop backoff)
    retry_after: datetime | None = None  # not tried again before then
    last_exit_code: int | None = None  # of the container that failed last
    last_log: str | None = None  # its last log lines, secrets blanked

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "worker": self.worker, "status": self.status, "message": self.message,
                "revision": self.revision, "crashCount": self.crash_count,
                "retryAfter": self.retry_after.isoformat() if self.retry_after else None,
                "lastExitCode": self.last_exit_code, "lastLog": self.last_log}


@dataclass(frozen=True)
class DeploymentStatus:
    name: str
    state: DeploymentState
    reason: str
    last_applied_revision: str | None
    last_attempted_revision: str | None
    ready: int
    wanted: int
    replicas: tuple[ReplicaLine, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "reason": self.reason,
                "lastAppliedRevision": self.last_applied_revision,
                "lastAttemptedRevision": self.last_attempted_revision, "replicasReady": self.ready,
                "replicasWanted": self.wanted, "replicas": [line.to_json() for line in self.replicas]}


@dataclass(frozen=True)
class FleetStatus:
    sync: SyncState
    sync_message: str
    head: str | None  # the branch's commit, when it was read
    applied: str | None  # the revision of the last succeeded sync run
    deployments: tuple[DeploymentStatus, ...]

    def to_json(self) -> dict[str, Any]:
        return {"sync": {"state": self.sync, "message": self.sync_message, "head": self.head,
                         "revision": self.applied},
                "deployments": [deployment.to_json() for deployment in self.deployments]}


def fleet_status(session: Session, *, head: str | None = None,
                 desired: Mapping[str, str] | None = None) -> FleetStatus:
    """Every recorded deployment (and, with `desired`, the commit's deployments never applied), by name.
    `head`: the branch's commit, when known; without it the sync state is Unknown. `desired`: the commit's
    deployments and the hash of each one's effective spec (`backends.spec_hash`)."""
    applied_run = last_applied_run(session)
    latest = session.scalars(select(SyncRun).order_by(SyncRun.id.desc()).limit(1)).one_or_none()
    applied = applied_run.revision if applied_run is not None else None
    sync: SyncState
    if head is None:
        sync, message = "Unknown", "the branch's commit was not read (pass --repo)"
    else:
        sync, message = compare_revisions(head, applied, latest_revision=latest.revision if latest else None,
                                          latest_status=latest.status if latest else None,
                                          latest_error=latest.error if latest else None)
    replicas: dict[str, list[Replica]] = {}
    for row in session.scalars(select(Replica).order_by(Replica.deployment_name, Replica.ordinal)):
        replicas.setdefault(row.deployment_name, []).append(row)
    rows = {row.name: row for row in session.scalars(select(Deployment))}
    names = sorted(set(rows) | set(replicas) | set(desired or ()))
    found = tuple(_deployment(name, rows.get(name), replicas.get(name, []), head=head, desired=desired)
                  for name in names)
    return FleetStatus(sync, message, head, applied, found)


def _deployment(name: str, row: Deployment | None, replicas: list[Replica], *, head: str | None,
                desired: Mapping[str, str] | None) -> DeploymentStatus:
    lines = tuple(ReplicaLine(f"{name}/{r.ordinal}", r.worker_name, r.status, r.message, r.revision,
                              r.crash_count, r.retry_after, r.crash_exit_code, r.crash_log)
                  for r in replicas)
    spec = normalize_applied(name, row.spec or {}) if row is not None else None
    wanted = spec.replicas if spec is not None else 0
    ready = sum(1 for r in replicas if r.status == "ready")
    state, reason = _state(name, row, replicas, ready, wanted, head=head, desired=desired)
    return DeploymentStatus(name, state, reason, row.revision if row else None,
                            row.last_attempted_revision if row else None, ready, wanted, lines)


def _state(name: str, row: Deployment | None, replicas: list[Replica], ready: int, wanted: int, *,
           head: str | None, desired: Mapping[str, str] | None) -> tuple[DeploymentState, str]:
    degraded = _condition(row.conditions if row else [], "Degraded")
    if degraded is not None and degraded.get("status") == "True":
        reason, message = str(degraded.get("reason") or ""), str(degraded.get("message") or "")
        return "Degraded", (f"{reason}: {message}" if reason and message
                            else message or reason or "the last pass failed on it")
    broken = [r for r in replicas if r.status in _BROKEN]
    if broken:
        first = broken[0]
        return "Degraded", f"replica {first.ordinal} on {first.worker_name} is {first.status}: {first.message or ''}"
    progressing = _condition(row.conditions if row else [], "Progressing")
    if progressing is not None and progressing.get("reason") == "RolloutInProgress" \
            and progressing.get("status") == "True":
        return "Progressing", str(progressing.get("message") or "a pass is applying a change to it")
    unsettled = [r for r in replicas if r.status in _UNSETTLED]
    if unsettled:
        first = unsettled[0]
        return "Progressing", f"replica {first.ordinal} on {first.worker_name} is {first.status}"
    if row is not None and ready < wanted:
        return "Progressing", f"{ready}/{wanted} replicas ready"
    if desired is not None and name not in desired:
        return "OutOfSync", "removed from the commit and still running (an apply deletes it unless pruning is off)"
    if row is None:
        return "OutOfSync", "in the commit, not applied yet"
    if desired is not None:
        if desired[name] != row.spec_hash:
            return "OutOfSync", "the commit changes its spec; the next apply rolls it out"
    elif head is not None and row.revision != head:
        applied = f"last applied from {row.revision[:12]}" if row.revision else "never applied"
        return "OutOfSync", f"{head[:12]} is not applied to it ({applied})"
    return "Synced", f"{ready}/{wanted} replicas ready" + (f" at {row.revision[:12]}" if row.revision else "")


def _condition(conditions: Sequence[Mapping[str, Any]] | None, kind: str) -> Mapping[str, Any] | None:
    for item in conditions or []:
        if isinstance(item, Mapping) and item.get("type") == kind:
            return item
    return None
