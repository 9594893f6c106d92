"""The live half of observed state: what lmstack's containers on each worker really are.

The database says which replica should run where; Docker says what runs. A replica whose container is
gone is `missing`, one whose container stopped is `failed` (the planner recreates both). A container
carrying lmstack's labels that no replica row owns is an orphan (e.g. left by a crash between creating
it and recording it) and is removed, so a pass never leaves duplicates behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

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
class LiveView:
    observed: Observed
    orphans: tuple[Orphan, ...]
    unreachable: Mapping[str, str]  # worker -> why its containers could not be listed
    containers: Mapping[tuple[str, int], ManagedContainer]  # (deployment, ordinal) -> its current container


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
            continue
        claimed.add(match.id)
        current[(replica.deployment, replica.ordinal)] = match
        # A running container keeps its recorded status: one recorded as failed (e.g. never became ready)
        # is recreated by the next pass, not taken for healthy because Docker restarted it.
        status = replica.status if match.state == "running" else "failed"
        replicas.append(replace(replica, status=status))

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
    )


def _match(replica: ReplicaObservation, containers: list[ManagedContainer]) -> ManagedContainer | None:
    """The replica's container: by recorded id, else the one with its spec hash (recorded before a crash)."""
    for container in containers:
        if replica.container_id is not None and container.id.startswith(replica.container_id):
            return container
    same_spec = [c for c in containers if c.labels.get(LABEL_SPEC_HASH) == replica.spec_hash]
    running = [c for c in same_spec if c.state == "running"]
    candidates = running or same_spec
    return candidates[0] if candidates else None
