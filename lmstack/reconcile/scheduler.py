"""Replica placement over the fleet's free GPUs: pure, deterministic, fast enough for 100k replicas.

A GPU holds at most one replica. A GPU is usable by a request when lmstack may use it (the worker's
`gpus`), no other replica holds it, and its memory not held by other processes covers `gpuMemory`.
Within one planning pass capacity only shrinks: a replica that moves keeps its old GPUs until the
next pass (it serves until its replacement is ready), so a request shape that failed fails again.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lmstack.manifests.quantity import format_quantity
from lmstack.manifests.schema import Deployment, Worker
from lmstack.reconcile.model import Placement, WorkerObservation

# (placement.workers, placement.selector), both sorted: requests with equal keys have equal candidates.
FilterKey = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Request:
    deployment: str
    gpus: int
    gpu_memory: int = 0  # bytes needed free on each GPU; 0 = any
    workers: tuple[str, ...] = ()  # sorted; empty = any worker
    selector: tuple[tuple[str, str], ...] = ()  # sorted label pairs a worker must have
    spread: bool = False
    filter_key: FilterKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "filter_key", (self.workers, self.selector))

    @classmethod
    def of(cls, deployment: Deployment) -> Request:
        spec = deployment.spec
        return cls(
            deployment=deployment.metadata.name,
            gpus=spec.resources.gpus,
            gpu_memory=spec.resources.gpu_memory or 0,
            workers=tuple(sorted(set(spec.placement.workers))),
            selector=tuple(sorted(spec.placement.selector.items())),
            spread=spec.placement.strategy == "spread",
        )

    @property
    def filtered(self) -> bool:
        return bool(self.workers or self.selector)

    def describe(self) -> str:
        if self.gpus == 0:
            return "needs a Ready worker"
        memory = f" with {format_quantity(self.gpu_memory)} free" if self.gpu_memory else ""
        return f"needs {self.gpus} GPU{'s' if self.gpus != 1 else ''}{memory}"

    def describe_filter(self) -> str:
        parts = []
        if self.workers:
            parts.append("workers " + ", ".join(self.workers))
        if self.selector:
            parts.append("selector " + ", ".join(f"{key}={value}" for key, value in self.selector))
        return "; ".join(parts)


class _Node:
    __slots__ = ("free", "holders", "labels", "memory", "name", "present", "ready", "residents", "status")

    def __init__(self, name: str, labels: Mapping[str, str], status: str) -> None:
        self.name = name
        self.labels = labels
        self.ready = not status
        self.status = status  # why nothing is placed here ("" when Ready)
        self.present: frozenset[int] = frozenset()  # GPU indices the facts list
        self.memory: dict[int, int] = {}  # GPU index -> bytes free of unmanaged use, for GPUs lmstack may use
        self.free: dict[int, int] = {}  # the part of `memory` no replica holds
        self.holders: dict[int, str] = {}  # GPU index -> the replica holding it
        self.residents: set[str] = set()  # replicas placed or kept here in this pass

    def usable(self, memory: int, holder: str | None = None) -> list[int]:
        """GPU indices free (or held by `holder` itself) with at least `memory` bytes, lowest first."""
        return sorted(index for index, free in self.memory.items()
                      if free >= memory and (index in self.free or self.holders.get(index) == holder))

    def count_usable(self, memory: int) -> int:
        if memory == 0:
            return len(self.free)
        return sum(1 for free in self.free.values() if free >= memory)


def _node(name: str, worker: Worker, facts: WorkerObservation | None) -> _Node:
    if facts is None or not facts.facts_known:
        return _Node(name, worker.metadata.labels, f"{name} has no facts yet")
    if not facts.ready:
        reason = facts.reason or "no reason given"
        return _Node(name, worker.metadata.labels, f"{name} is not Ready ({reason})")
    node = _Node(name, worker.metadata.labels, "")
    allowed = None if worker.spec.gpus == "all" else set(worker.spec.gpus)
    node.present = frozenset(gpu.index for gpu in facts.gpus)
    node.memory = {gpu.index: gpu.memory_free for gpu in facts.gpus
                   if allowed is None or gpu.index in allowed}
    node.free = dict(node.memory)
    return node


class Scheduler:
    """Tracks free GPUs during one planning pass: `reserve` what existing replicas hold, `place` the rest.

    Holders are replica names ("qwen/0"): a replica may be re-placed onto GPUs it already holds.
    """

    def __init__(self, workers: Mapping[str, Worker], observed: Mapping[str, WorkerObservation]) -> None:
        self._nodes: dict[str, _Node] = {name: _node(name, workers[name], observed.get(name))
                                         for name in sorted(workers)}
        # Ready workers bucketed by free GPU count, names sorted: binpack walks up, spread walks down.
        self._buckets: dict[int, list[str]] = defaultdict(list)
        for node in self._nodes.values():
            if node.ready:
                self._buckets[len(node.free)].append(node.name)
        self._max_free = max(self._buckets, default=0)
        self._per_deployment: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._candidates: dict[FilterKey, list[_Node]] = {}
        # Request shape -> (generation, reason). GPUs taken since (a newer generation) make only the
        # reason stale, never the failure: capacity only shrinks within a pass.
        self._failures: dict[tuple[int, int, FilterKey], tuple[int, str]] = {}
        self._generation = 0

    # -- questions -------------------------------------------------------------------------------

    def knows(self, worker: str) -> bool:
        return worker in self._nodes

    def is_ready(self, worker: str) -> bool:
        node = self._nodes.get(worker)
        return node is not None and node.ready

    def status(self, worker: str) -> str:
        """Why nothing is placed on `worker` ("gpu-b is not Ready (unreachable)"); "" when Ready."""
        return self._nodes[worker].status

    def allows(self, request: Request, worker: str) -> bool:
        node = self._nodes.get(worker)
        return node is not None and self._matches(request, node)

    def holds(self, holder: str, worker: str, gpus: Iterable[int], memory: int) -> str | None:
        """None if `holder` may keep `gpus` on the Ready `worker` with `memory` free on each, else why not."""
        node = self._nodes[worker]
        for index in gpus:
            if index not in node.present:
                return f"{worker} has no GPU {index}"
            if index not in node.memory:
                return f"GPU {index} on {worker} is not in the worker's gpus"
            other = node.holders.get(index)
            if other is not None and other != holder:
                return f"GPU {index} on {worker} is also claimed by {other}"
            if node.memory[index] < memory:
                return (f"GPU {index} on {worker} has {format_quantity(node.memory[index])} free, "
                        f"needs {format_quantity(memory)}")
        return None

    # -- changes ---------------------------------------------------------------------------------

    def reserve(self, holder: str, deployment: str, worker: str, gpus: Iterable[int]) -> None:
        """`holder` runs on `worker` and holds those of `gpus` that are free."""
        node = self._nodes.get(worker)
        if node is None:
            return
        if holder not in node.residents:
            node.residents.add(holder)
            self._per_deployment[deployment][worker] += 1
        taken = [index for index in gpus if index in node.free]
        if not taken:
            return
        self._generation += 1
        bucket = self._buckets[len(node.free)]
        del bucket[bisect.bisect_left(bucket, node.name)]
        for index in taken:
            del node.free[index]
            node.holders[index] = holder
        bisect.insort(self._buckets[len(node.free)], node.name)

    def place(self, request: Request, holder: str, *, prefer: str | None = None) -> Placement | str:
        """A placement, or the reason there is none ("needs 2 GPUs with 24Gi free; gpu-a has 1 free").

        `prefer`: the worker the replica runs on now; it stays there (on its own GPUs first) if it fits.
        """
        if prefer is not None:
            placed = self._place_on(prefer, request, holder)
            if placed is not None:
                return placed
        key = (request.gpus, request.gpu_memory, request.filter_key)
        failed = self._failures.get(key)
        if failed is not None:
            if failed[0] != self._generation:  # still fails; say how things stand now
                failed = (self._generation, self._explain(request))
                self._failures[key] = failed
            return failed[1]
        node = self._choose(request)
        if node is None:
            reason = self._explain(request)
            self._failures[key] = (self._generation, reason)
            return reason
        return self._take(node, request, holder, node.usable(request.gpu_memory)[: request.gpus])

    # -- internals -------------------------------------------------------------------------------

    def _place_on(self, worker: str, request: Request, holder: str) -> Placement | None:
        node = self._nodes.get(worker)
        if node is None or not node.ready or not self._matches(request, node):
            return None
        usable = node.usable(request.gpu_memory, holder)
        if len(usable) < request.gpus:
            return None
        own = [index for index in usable if node.holders.get(index) == holder]
        chosen = (own + [index for index in usable if index not in own])[: request.gpus]
        return self._take(node, request, holder, sorted(chosen))

    def _take(self, node: _Node, request: Request, holder: str, gpus: list[int]) -> Placement:
        self.reserve(holder, request.deployment, node.name, gpus)
        return Placement(node.name, tuple(gpus))

    @staticmethod
    def _fits(node: _Node, request: Request) -> bool:
        return node.count_usable(request.gpu_memory) >= request.gpus

    @staticmethod
    def _matches(request: Request, node: _Node) -> bool:
        if request.workers and node.name not in request.workers:
            return False
        return all(node.labels.get(key) == value for key, value in request.selector)

    def _candidates_for(self, request: Request) -> list[_Node]:
        nodes = self._candidates.get(request.filter_key)
        if nodes is None:
            nodes = [node for node in self._nodes.values() if self._matches(request, node)]
            self._candidates[request.filter_key] = nodes
        return nodes

    def _choose(self, request: Request) -> _Node | None:
        """Binpack: the fewest free GPUs that fit. Spread: the fewest replicas of this deployment, then
        the most free GPUs. Ties go to the first name."""
        counts = self._per_deployment[request.deployment]
        if request.filtered:
            fitting = [node for node in self._candidates_for(request)
                       if node.ready and self._fits(node, request)]
            if not fitting:
                return None
            if request.spread:
                return min(fitting, key=lambda n: (counts.get(n.name, 0), -len(n.free), n.name))
            return min(fitting, key=lambda n: (len(n.free), n.name))
        if not request.spread:
            for free in range(request.gpus, self._max_free + 1):
                for name in self._buckets.get(free, ()):
                    node = self._nodes[name]
                    if self._fits(node, request):
                        return node
            return None
        best: tuple[int, int, str] | None = None
        for free in range(self._max_free, request.gpus - 1, -1):
            for name in self._buckets.get(free, ()):
                node = self._nodes[name]
                if not self._fits(node, request):
                    continue
                rank = (counts.get(name, 0), -free, name)
                if rank[0] == 0:
                    return node  # no replica of this deployment yet, and the most free GPUs
                if best is None or rank < best:
                    best = rank
        return self._nodes[best[2]] if best is not None else None

    def _explain(self, request: Request, limit: int = 4) -> str:
        nodes = self._candidates_for(request)
        if not nodes:
            if not self._nodes:
                return f"{request.describe()}; no workers are defined"
            return f"{request.describe()}; no worker matches its placement ({request.describe_filter()})"
        ready = sorted((node for node in nodes if node.ready),
                       key=lambda node: (-node.count_usable(request.gpu_memory), -len(node.free), node.name))
        # The closest to fitting first: what a user would free up.
        details = [self._shortfall(node, request) for node in ready]
        details += [node.status for node in nodes if not node.ready]
        shown = ", ".join(details[:limit])
        more = f" and {len(details) - limit} more workers" if len(details) > limit else ""
        return f"{request.describe()}; {shown}{more}"

    @staticmethod
    def _shortfall(node: _Node, request: Request) -> str:
        free = len(node.free)
        if free < request.gpus or not request.gpu_memory:
            return f"{node.name} has {free} free"
        big_enough = node.count_usable(request.gpu_memory)
        memory = format_quantity(request.gpu_memory)
        return f"{node.name} has {free} free but only {big_enough} with {memory} free"
