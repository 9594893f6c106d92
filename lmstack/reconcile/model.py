"""The planner's inputs (observed state) and output (a Plan of frozen actions)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(frozen=True, slots=True)
class GpuFacts:
    index: int
    memory_total: int
    # Memory held by processes lmstack did not start; lmstack's own replicas are not counted here.
    memory_unmanaged: int = 0
    name: str = ""

    @property
    def memory_free(self) -> int:
        return max(self.memory_total - self.memory_unmanaged, 0)


@dataclass(frozen=True, slots=True)
class WorkerObservation:
    """The latest facts stored for a worker. `facts_known` False: never gathered."""

    name: str
    facts_known: bool
    ready: bool
    reason: str | None = None
    gpus: tuple[GpuFacts, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplicaObservation:
    deployment: str
    ordinal: int
    worker: str
    gpus: tuple[int, ...]
    spec: Mapping[str, Any]  # the effective spec it was created with, as stored (read with normalize_applied)
    status: str = "ready"
    container_id: str | None = None
    spec_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Observed:
    workers: Mapping[str, WorkerObservation] = field(default_factory=dict)
    replicas: tuple[ReplicaObservation, ...] = ()


class ActionKind(StrEnum):
    CREATE = "create"
    RECREATE = "recreate"
    UPDATE = "update"  # an in-place change the running engine takes without a restart
    DELETE = "delete"
    NOOP = "noop"


@dataclass(frozen=True, slots=True)
class Placement:
    worker: str
    gpus: tuple[int, ...]

    def __str__(self) -> str:
        gpus = ",".join(str(index) for index in self.gpus)
        return f"{self.worker} gpu {gpus}" if self.gpus else f"{self.worker} (cpu)"


@dataclass(frozen=True, slots=True)
class FieldChange:
    path: str
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    deployment: str
    replica: int
    reason: str
    placement: Placement | None = None  # where the replica will run (None for delete)
    previous: Placement | None = None  # where it runs now (None for create)
    changes: tuple[FieldChange, ...] = ()
    spec_hash: str | None = None
    # An UPDATE that takes over a replica a stopped pass left unsettled (starting, pending, deleting): wait
    # for its container's readiness as a create does, and recreate it when it does not become ready.
    adopt: bool = False
    # A RECREATE by surge: the ordinal its replacement takes (a replica row per container, so the new one
    # needs its own). The new replica starts on `placement` beside the old one and must be Ready before the
    # old one is drained and removed; if it never is, it is removed and the old one keeps serving.
    # None: the old replica is drained and stopped first (its GPUs are the new one's).
    surge: int | None = None

    @property
    def replica_name(self) -> str:
        return f"{self.deployment}/{self.replica}"

    @property
    def new_replica(self) -> int:
        """The ordinal of the container this action starts (the surge's, else the replica's own)."""
        return self.replica if self.surge is None else self.surge


@dataclass(frozen=True, slots=True)
class Unplaceable:
    deployment: str
    replica: int
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    unplaceable: tuple[Unplaceable, ...] = ()
    notes: tuple[str, ...] = ()
    # Deployments with no replica serving for a while during this plan (their replicas are stopped before
    # their replacements are ready: no room for a surge), each with why.
    downtime: tuple[tuple[str, str], ...] = ()

    @property
    def changes(self) -> tuple[Action, ...]:
        return tuple(action for action in self.actions if action.kind is not ActionKind.NOOP)

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def counts(self) -> dict[ActionKind, int]:
        counted = Counter(action.kind for action in self.actions)
        return {kind: counted.get(kind, 0) for kind in ActionKind}

    def to_json(self) -> dict[str, Any]:
        def placement(value: Placement | None) -> dict[str, Any] | None:
            return None if value is None else {"worker": value.worker, "gpus": list(value.gpus)}

        return {
            "actions": [
                {
                    "kind": action.kind.value,
                    "deployment": action.deployment,
                    "replica": action.replica,
                    "reason": action.reason,
                    "placement": placement(action.placement),
                    "previous": placement(action.previous),
                    "changes": [{"path": c.path, "old": c.old, "new": c.new} for c in action.changes],
                    "specHash": action.spec_hash,
                    "adopt": action.adopt,
                    "surge": action.surge,
                }
                for action in self.actions
            ],
            "unplaceable": [
                {"deployment": item.deployment, "replica": item.replica, "reason": item.reason}
                for item in self.unplaceable
            ],
            "notes": list(self.notes),
            "downtime": [{"deployment": name, "reason": reason} for name, reason in self.downtime],
            "summary": {kind.value: count for kind, count in self.counts().items()}
            | {"unplaceable": len(self.unplaceable)},
        }
