"""The live half of observed state: what lmstack's containers on each worker really are.

The database says which replica should run where; Docker says what runs. A replica whose container is
gone is `missing`, one whose container stopped, or runs another image than the replica's spec (replaced by
hand), is `failed` (the planner recreates both). A container
carrying lmstack's labels that no replica row owns is an orphan (e.g. left by a crash between creating
it and recording it) and is removed, so a pass never leaves duplicates behind.

A replica recorded as running (ready, starting, ...) whose container is gone or stopped is listed in
`lost`, with what was seen: the pass records that at once, before it repairs anything, so the gateway
stops routing to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

from lmstack.backends.container import LABEL_DEPLOYMENT, LABEL_REPLICA, LABEL_SPEC_HASH
from lmstack.nodes.docker import DockerPool, ManagedContainer, NodeError
from lmstack.reconcile.model import Observed, ReplicaObservation


@dataclass(frozen=True)
class Orphan:
    worker: str
    container_id: str
    name: str
    reason: str


@dataclass(frozen=True)
class Lost:
    """A replica recorded as running whose container is gone (`missing`) or stopped (`failed`)."""

    deployment: str
    ordinal: int
    worker: str
    recorded: str  # the status the database had
    recorded_container: str | None  # the container id the database had
    status: Literal["missing", "failed"]
    message: str


@dataclass(frozen=True)
class LiveView:
    observed: Observed
    orphans: tuple[Orphan, ...]
    unreachable: Mapping[str, str]  # worker -> why its containers could not be listed
    containers: Mapping[tuple[str, int], ManagedContainer]  # (deployment, ordinal) -> its current container
    lost: tuple[Lost, ...] = ()
    observed_live: bool = True  # False: nothing was asked of Docker (the recorded state, as it is)


def recorded_only(stored: Observed) -> LiveView:
    """The recorded state as the live view, without asking Docker (`lmstack plan --offline`)."""
    return LiveView(observed=stored, orphans=(), unreachable={}, containers={}, observed_live=False)


def observe_live(stored: Observed, pool: DockerPool, workers: Iterable[str], *, parallel: int = 8) -> LiveView:
    names = sorted(set(workers))
    listed: dict[str, list[ManagedContainer]] = {}
    unreachable: dict[str, str] = {}

    def list_one(worker: str) -> tuple[str, list[ManagedContainer] | str]:
        try:
            return worker, pool.list_managed(worker)
        except NodeError as exc:
            return worker, str(exc)

    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(names) or 1))) as threads:
        for worker, answer in threads.map(list_one, names):
            if isinstance(answer, str):
                unreachable[worker] = answer
            else:
                listed[worker] = answer

    replicas: list[ReplicaObservation] = []
    current: dict[tuple[str, int], ManagedContainer] = {}
    claimed: set[str] = set()
    lost: list[Lost] = []
    for replica in stored.replicas:
        containers = listed.get(replica.worker)
        if containers is None:
            replicas.append(replica)  # worker not listed (unreachable or not ours to ask): trust the record
            continue
        mine = [c for c in containers
                if c.labels.get(LABEL_DEPLOYMENT) == replica.deployment
                and c.labels.get(LABEL_REPLICA) == str(replica.ordinal)]
        match = _match(replica, mine)
        if match is None:
            replicas.append(replace(replica, status="missing"))
            if replica.status not in _BROKEN:
                what = f"container {replica.container_id[:12]}" if replica.container_id else "its container"
                lost.append(_lost(replica, "missing", f"{what} is gone from {replica.worker} (removed or never "
                                                      "started)"))
            continue
        claimed.add(match.id)
        current[(replica.deployment, replica.ordinal)] = match
        expected = str(replica.spec.get("image") or "")
        if expected and match.image != expected:
            # Replaced by hand with lmstack's labels but another image: not what the commit asks for.
            replicas.append(replace(replica, status="failed"))
            lost.append(_lost(replica, "failed", f"container {match.name} on {replica.worker} runs image "
                                                 f"{match.image}, not {expected} (changed by hand): it is recreated"))
            continue
        # A running container keeps its recorded status: one recorded as failed (e.g. never became ready)
        # is recreated by the next pass, not taken for healthy because Docker restarted it.
        status = replica.status if match.state == "running" else "failed"
        replicas.append(replace(replica, status=status))
        if status == "failed" and replica.status not in _BROKEN:
            exit_code = f", exit code {match.exit_code}" if match.exit_code is not None else ""
            oom = ", killed for lack of memory" if match.oom_killed else ""
            lost.append(_lost(replica, "failed", f"container {match.name} on {replica.worker} is {match.state} "
                                                 f"({match.status}{exit_code}{oom})"))

    orphans = [
        Orphan(worker, container.id, container.name, "no replica record owns it")
        for worker, containers in sorted(listed.items())
        for container in containers
        if container.id not in claimed
    ]
    return LiveView(
        observed=Observed(workers=stored.workers, replicas=tuple(replicas)),
        orphans=tuple(orphans),
        unreachable=unreachable,
        containers=current,
        lost=tuple(lost),
    )


# Statuses already saying the container does not run: nothing new to record.
_BROKEN = frozenset({"missing", "failed"})


def _lost(replica: ReplicaObservation, status: Literal["missing", "failed"], message: str) -> Lost:
    return Lost(replica.deployment, replica.ordinal, replica.worker, replica.status, replica.container_id, status,
                message)


def _match(replica: ReplicaObservation, containers: list[ManagedContainer]) -> ManagedContainer | None:
    """The replica's container: by recorded id, else the one with its spec hash (recorded before a crash)."""
    for container in containers:
        if replica.container_id is not None and container.id.startswith(replica.container_id):
            return container
    same_spec = [c for c in containers if c.labels.get(LABEL_SPEC_HASH) == replica.spec_hash]
    running = [c for c in same_spec if c.state == "running"]
    candidates = running or same_spec
    return candidates[0] if candidates else None
