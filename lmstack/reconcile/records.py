"""What the reconciler writes to PostgreSQL: replicas, deployments' status, sync runs and events.

A deployment's conditions, written at the end of every pass that applies:
- Ready: every replica its spec asks for is ready (ReplicasReady / ReplicasNotReady, "2/3 replicas ready");
- Progressing: replicas are still coming up or going (ReplicasChanging), none failed; otherwise ReplicasSettled.
  When a pass starts acting on a deployment it sets this one at once (RolloutInProgress: the revision and
  the actions), so status shows the rollout while it runs;
- Degraded: a replica keeps failing and is backed off (CrashLoopBackOff: the exit code, when it is backed
  off until, the last log lines), or an action of the pass failed or a replica could not be acted on
  (ActionFailed); otherwise AsExpected.
A worker's conditions, written by every pass's observe phase (`record_worker_conditions`):
- Ready: its last facts gathering succeeded (FactsGathered), else FactsFailed / NoFacts with why;
- Progressing: a pass is creating, replacing or removing replicas on it (ReplicasChanging: which), set when
  the pass starts acting and cleared when it ends (ReplicasSettled);
- Degraded: its containers could not be listed (ContainersNotListed), or a replica on it was found gone or
  stopped (ReplicasLost); otherwise AsExpected.
A condition's lastTransitionTime changes only when its status does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from lmstack.backends import EffectiveSpec, spec_hash
from lmstack.state.models import Deployment, Event, EventType, Replica, ReplicaStatus, SyncRun, Worker


def last_applied_run(session: Session) -> SyncRun | None:
    """The newest succeeded sync run: what the fleet was last made to match."""
    return session.scalars(select(SyncRun).where(SyncRun.status == "succeeded")
                           .order_by(SyncRun.id.desc()).limit(1)).one_or_none()


def now() -> datetime:
    return datetime.now(UTC)


def condition(kind: str, status: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": now().isoformat()}


def upsert_replica(session: Session, *, deployment: str, ordinal: int, worker: str, gpus: Sequence[int],
                   container_id: str | None, endpoint: str | None, spec: EffectiveSpec, spec_hash: str,
                   revision: str | None, status: ReplicaStatus, message: str | None,
                   engine_key: str | None = None) -> None:
    """Insert or replace the replica's row. `engine_key`: the key its (new) container was started with."""
    values = {
        "deployment_name": deployment, "ordinal": ordinal, "worker_name": worker, "gpu_indices": list(gpus),
        "container_id": container_id, "endpoint": endpoint, "spec": spec.to_json(), "spec_hash": spec_hash,
        "revision": revision, "status": status, "message": message,
        "conditions": [condition("Ready", status == "ready", status.capitalize(), message or "")],
        "engine_key": engine_key,
    }
    if status == "ready":
        values["retry_after"] = None  # Ready: no longer backing off (the failure count stays: backoff.py)
    statement = insert(Replica).values(**values)
    set_: dict[str, Any] = {key: statement.excluded[key] for key in values if key not in ("deployment_name", "ordinal")}
    # A replica recorded failed keeps the key its (failed) container was started with: that container's last
    # log lines are read for the crash report, and the key is blanked from them (backoff.py).
    set_["engine_key"] = case((statement.excluded.status == "failed",
                               func.coalesce(statement.excluded.engine_key, Replica.engine_key)),
                              else_=statement.excluded.engine_key)
    session.execute(statement.on_conflict_do_update(
        index_elements=[Replica.deployment_name, Replica.ordinal], set_={**set_, "updated_at": func.now()}))


def engine_key_of(session: Session, deployment: str, ordinal: int) -> str | None:
    """The API key the replica's engine was started with (None: it has none, or no such replica)."""
    return session.scalar(select(Replica.engine_key).where(Replica.deployment_name == deployment,
                                                           Replica.ordinal == ordinal))


def set_replica_status(session: Session, deployment: str, ordinal: int, status: ReplicaStatus,
                       message: str | None = None, *, container_id: str | None = None) -> None:
    values: dict[str, Any] = {"status": status, "message": message, "updated_at": func.now(),
                              "conditions": [condition("Ready", status == "ready", status.capitalize(),
                                                       message or "")]}
    if container_id is not None:
        values["container_id"] = container_id
    if status == "ready":
        values["retry_after"] = None  # Ready: no longer backing off (the failure count stays: backoff.py)
    session.execute(update(Replica).where(Replica.deployment_name == deployment, Replica.ordinal == ordinal)
                    .values(**values))


def record_lost(session: Session, *, deployment: str, ordinal: int, recorded: str, recorded_container: str | None,
                status: ReplicaStatus, message: str) -> bool:
    """Record that a replica's container was seen gone or stopped. Only when the row still says what the pass
    read (status and container): a row another process changed meanwhile is left as it is. True: recorded."""
    values: dict[str, Any] = {"status": status, "message": message, "updated_at": func.now(),
                              "conditions": [condition("Ready", False, status.capitalize(), message)]}
    same_container = (Replica.container_id.is_(None) if recorded_container is None
                      else Replica.container_id == recorded_container)
    result = session.execute(update(Replica).where(
        Replica.deployment_name == deployment, Replica.ordinal == ordinal, Replica.status == recorded,
        same_container).values(**values))
    return bool(getattr(result, "rowcount", 0))


def record_crash(session: Session, *, deployment: str, ordinal: int, count: int, crashed_at: datetime,
                 retry_after: datetime, exit_code: int | None, log: str | None, spec_hash: str | None) -> None:
    """Record a failure of the replica's own (backoff.py): how many in a row, when it may be tried again, and
    what its container left (exit code, last log lines with secrets blanked)."""
    session.execute(update(Replica).where(Replica.deployment_name == deployment, Replica.ordinal == ordinal).values(
        crash_count=count, crashed_at=crashed_at, retry_after=retry_after, crash_exit_code=exit_code,
        crash_log=log, crash_spec_hash=spec_hash, updated_at=func.now()))


def crash_message(replica: Replica) -> str:
    """One line on a backed-off replica: how it failed, until when it waits, its last log lines."""
    exit_code = f" (exit code {replica.crash_exit_code})" if replica.crash_exit_code is not None else ""
    times = "once" if replica.crash_count == 1 else f"{replica.crash_count} times in a row"
    text = f"replica {replica.ordinal} on {replica.worker_name} failed{exit_code}, {times}"
    if replica.retry_after is not None and replica.retry_after > now():
        text += f"; backing off until {replica.retry_after.astimezone(UTC):%H:%M:%S} UTC " \
                f"(attempt {replica.crash_count + 1})"
    if replica.crash_log:
        text += f"; last log lines: {replica.crash_log}"
    return text


def delete_replica(session: Session, deployment: str, ordinal: int, worker: str) -> None:
    session.execute(delete(Replica).where(Replica.deployment_name == deployment, Replica.ordinal == ordinal,
                                          Replica.worker_name == worker))


def add_event(session: Session, *, type: EventType, kind: str, name: str, reason: str, message: str,
              sync_run: int | None) -> None:
    session.add(Event(type=type, object_kind=kind, object_name=name, reason=reason, message=message,
                      sync_run_id=sync_run))


def start_sync_run(session: Session, *, revision: str | None, subject: str | None, source: str, trigger: str,
                   plan: Mapping[str, Any]) -> int:
    run = SyncRun(revision=revision, subject=subject, source=source, trigger=trigger, status="running",
                  plan=dict(plan))
    session.add(run)
    session.flush()
    return run.id


def finish_sync_run(session: Session, run_id: int, *, ok: bool, result: Mapping[str, Any],
                    error: str | None) -> None:
    session.execute(update(SyncRun).where(SyncRun.id == run_id).values(
        status="succeeded" if ok else "failed", result=dict(result), error=error, finished_at=func.now()))


def record_deployments(session: Session, *, specs: Mapping[str, EffectiveSpec], failed: Mapping[str, str],
                       revision: str | None) -> None:
    """Upsert a row per desired deployment (served name, effective spec, hash, revisions, conditions) and drop
    rows of deployments gone from the manifests once none of their replicas remain."""
    previous = {row.name: row.conditions for row in session.scalars(select(Deployment)
                                                                     .where(Deployment.name.in_(list(specs))))}
    for name, spec in specs.items():
        replicas = session.scalars(select(Replica).where(Replica.deployment_name == name)
                                   .order_by(Replica.ordinal)).all()
        problem = failed.get(name)
        conditions = _keep_transitions(_conditions(spec, replicas, problem), previous.get(name) or [])
        values: dict[str, Any] = {"name": name, "served_name": spec.served_name, "spec": spec.to_json(),
                                  "spec_hash": spec_hash(spec), "last_attempted_revision": revision,
                                  "conditions": conditions}
        statement = insert(Deployment).values(**values, revision=revision if problem is None else None)
        set_: dict[str, Any] = {key: statement.excluded[key] for key in values if key != "name"}
        set_["updated_at"] = func.now()
        if problem is None:
            set_["revision"] = statement.excluded.revision
        session.execute(statement.on_conflict_do_update(index_elements=[Deployment.name], set_=set_))
    remaining = set(session.scalars(select(Replica.deployment_name).distinct()))
    session.execute(delete(Deployment).where(Deployment.name.not_in(list(specs)),
                                             Deployment.name.not_in(list(remaining))))


def _conditions(spec: EffectiveSpec, replicas: Sequence[Replica], problem: str | None) -> list[dict[str, Any]]:
    ready = sum(1 for replica in replicas if replica.status == "ready")
    wanted = spec.replicas
    backed_off = [r for r in replicas if r.status == "failed" and r.crash_count > 0 and r.retry_after is not None]
    if backed_off:
        degraded = condition("Degraded", True, "CrashLoopBackOff", crash_message(backed_off[0]))
    else:
        degraded = condition("Degraded", problem is not None, "ActionFailed" if problem else "AsExpected",
                             problem or "")
    changing = [r for r in replicas if r.status in ("pending", "starting", "deleting")]
    progressing = degraded["status"] == "False" and (bool(changing) or ready != wanted)
    return [
        condition("Ready", ready >= wanted, "ReplicasReady" if ready >= wanted else "ReplicasNotReady",
                  f"{ready}/{wanted} replicas ready"),
        condition("Progressing", progressing, "ReplicasChanging" if progressing else "ReplicasSettled",
                  f"{ready}/{wanted} replicas ready" + (f", {len(changing)} changing" if changing else "")),
        degraded,
    ]


def record_worker_conditions(session: Session, *, not_ready: Mapping[str, str], unlisted: Mapping[str, str],
                             lost: Mapping[str, Sequence[str]]) -> None:
    """Ready and Degraded for every worker row: `not_ready` (worker -> why its facts do not make it Ready),
    `unlisted` (worker -> why its containers could not be listed), `lost` (worker -> what was found gone or
    stopped on it this pass)."""
    for row in session.scalars(select(Worker)):
        why_not = not_ready.get(row.name)
        if row.facts_error:
            ready = condition("Ready", False, "FactsFailed", row.facts_error)
        elif row.facts is None or why_not is not None:
            ready = condition("Ready", False, "NoFacts", why_not or "facts not gathered yet")
        else:
            ready = condition("Ready", True, "FactsGathered", "")
        if row.name in unlisted:
            degraded = condition("Degraded", True, "ContainersNotListed", unlisted[row.name])
        elif lost.get(row.name):
            degraded = condition("Degraded", True, "ReplicasLost", "; ".join(lost[row.name]))
        else:
            degraded = condition("Degraded", False, "AsExpected", "")
        # No pass acts while this one (the leader) observes: whatever a killed pass left Progressing is settled.
        progressing = condition("Progressing", False, "ReplicasSettled", "")
        conditions = _keep_transitions([ready, progressing, degraded], row.conditions or [])
        if conditions != row.conditions:
            row.conditions = conditions


def record_progress_started(session: Session, *, deployments: Mapping[str, str],
                            workers: Mapping[str, Sequence[str]]) -> None:
    """A pass starts acting: Progressing on each deployment it changes (deployment -> what it does; one not
    recorded yet has no row until the pass ends) and on each worker it acts on (worker -> the replicas)."""
    for row in session.scalars(select(Deployment).where(Deployment.name.in_(list(deployments)))):
        row.conditions = _with(row.conditions, condition("Progressing", True, "RolloutInProgress",
                                                         deployments[row.name]))
    for worker in session.scalars(select(Worker).where(Worker.name.in_(list(workers)))):
        worker.conditions = _with(worker.conditions, condition("Progressing", True, "ReplicasChanging",
                                                               ", ".join(workers[worker.name])))


def record_progress_ended(session: Session, workers: Sequence[str]) -> None:
    """The pass is done with these workers (deployments' conditions are recomputed by record_deployments)."""
    for worker in session.scalars(select(Worker).where(Worker.name.in_(list(workers)))):
        worker.conditions = _with(worker.conditions, condition("Progressing", False, "ReplicasSettled", ""))


def _with(conditions: Sequence[Any] | None, new: dict[str, Any]) -> list[dict[str, Any]]:
    """`conditions` with `new` in place of the one of its type (appended when there is none)."""
    kept = [dict(c) for c in conditions or [] if isinstance(c, Mapping)]
    replaced = [new if c.get("type") == new["type"] else c for c in kept]
    if not any(c.get("type") == new["type"] for c in kept):
        replaced.append(new)
    return _keep_transitions(replaced, kept)


def _keep_transitions(conditions: list[dict[str, Any]], previous: Sequence[Any]) -> list[dict[str, Any]]:
    """The conditions, each with the previous lastTransitionTime when its status did not change."""
    before = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    for item in conditions:
        old = before.get(item["type"])
        if old is not None and old.get("status") == item["status"] and old.get("lastTransitionTime"):
            item["lastTransitionTime"] = old["lastTransitionTime"]
    return conditions
