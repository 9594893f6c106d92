"""Observed state for the planner, read from the database (the latest stored facts and replicas)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lmstack.reconcile.model import GpuFacts, Observed, ReplicaObservation, WorkerObservation
from lmstack.state.models import Replica, Worker


def load_observed(session: Session) -> Observed:
    workers = {row.name: _worker(row) for row in session.scalars(select(Worker))}
    replicas = tuple(
        ReplicaObservation(
            deployment=row.deployment_name,
            ordinal=row.ordinal,
            worker=row.worker_name,
            gpus=tuple(row.gpu_indices or ()),
            spec=row.spec,
            status=row.status,
            container_id=row.container_id,
            spec_hash=row.spec_hash,
        )
        for row in session.scalars(select(Replica).order_by(Replica.deployment_name, Replica.ordinal))
    )
    return Observed(workers=workers, replicas=replicas)


def _worker(row: Worker) -> WorkerObservation:
    if row.facts_error:
        return WorkerObservation(row.name, facts_known=True, ready=False, reason=row.facts_error)
    if row.facts is None:
        return WorkerObservation(row.name, facts_known=False, ready=False)
    return WorkerObservation(row.name, facts_known=True, ready=True,
                             gpus=tuple(_gpu(gpu) for gpu in row.facts.get("gpus", [])))


def _gpu(data: dict[str, Any]) -> GpuFacts:
    return GpuFacts(
        index=int(data["index"]),
        memory_total=int(data.get("memory_total", 0)),
        memory_unmanaged=int(data.get("memory_unmanaged", 0)),
        name=str(data.get("name", "")),
    )
