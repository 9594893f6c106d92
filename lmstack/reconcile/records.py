"""What the reconciler writes to PostgreSQL: replicas, deployments' status, sync runs and events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from lmstack.backends import EffectiveSpec, spec_hash
from lmstack.state.models import Deployment, Event, EventType, Replica, ReplicaStatus, SyncRun


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
    statement = insert(Replica).values(**values)
    session.execute(statement.on_conflict_do_update(
        index_elements=[Replica.deployment_name, Replica.ordinal],
        set_={**{key: statement.excluded[key] for key in values if key not in ("deployment_name", "ordinal")},
              "updated_at": func.now()},
    ))


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
    for name, spec in specs.items():
        replicas = session.scalars(select(Replica).where(Replica.deployment_name == name)).all()
        ready = sum(1 for replica in replicas if replica.status == "ready")
        wanted = spec.replicas
        problem = failed.get(name)
        conditions = [
            condition("Ready", ready >= wanted, "ReplicasReady" if ready >= wanted else "ReplicasNotReady",
                      f"{ready}/{wanted} replicas ready"),
            condition("Degraded", problem is not None, "ActionFailed" if problem else "AsExpected", problem or ""),
        ]
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
