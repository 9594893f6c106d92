"""Replica placement over the fleet's free GPUs: pure, deterministic, near-linear up to 100k replicas.

A GPU holds at most one replica. A GPU can take a request when lmstack may use it (the worker's
`gpus`), no other replica holds it, and its memory not held by other processes covers `gpuMemory`.
A worker fits a request when it is Ready, matches the placement and has `gpus` such GPUs.

- binpack: the fitting worker with the fewest GPUs that could take the request, then the first name;
- spread: the fitting worker with the fewest replicas of the deployment, then the most such GPUs,
  then the first name.

Within one pass capacity only shrinks: a replica that moves keeps its old GPUs until the next pass
(it serves until its replacement is ready).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from lmstack.manifests.quantity import format_quantity
from lmstack.manifests.schema import Deployment, Worker
from lmstack.reconcile.model import Placement, WorkerObservation

# (placement.workers, placement.selector), both sorted: requests with equal keys have equal candidates.
FilterKey = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
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
    __slots__ = ("free", "holders", "id", "labels", "memory", "name", "present", "ready", "residents",
                 "status", "views")

    def __init__(self, node_id: int, name: str, labels: Mapping[str, str], status: str) -> None:
        self.id = node_id  # position in name order: the lowest id is the first name
        self.name = name
        self.labels = labels
        self.ready = not status
        self.status = status  # why nothing is placed here ("" when Ready)
        self.present: frozenset[int] = frozenset()  # GPU indices the facts list
        self.memory: dict[int, int] = {}  # GPU index -> bytes free of unmanaged use, for GPUs lmstack may use
        self.free: dict[int, int] = {}  # the part of `memory` no replica holds
        self.holders: dict[int, str] = {}  # GPU index -> the replica holding it
        self.residents: set[str] = set()  # replicas kept or placed here in this pass
        self.views: list[_View] = []  # the views this node is in, updated when its GPUs are taken

    def usable(self, memory: int, holder: str | None = None) -> list[int]:
        """GPU indices free (or held by `holder` itself) with at least `memory` bytes, lowest first."""
        return sorted(index for index, free in self.memory.items()
                      if free >= memory and (index in self.free or self.holders.get(index) == holder))

    def count_usable(self, memory: int) -> int:
        if memory == 0:
            return len(self.free)
        return sum(1 for free in self.free.values() if free >= memory)


class _Filter:
    """The workers one placement filter allows, in name order, and a count of changes to their GPUs."""

    __slots__ = ("nodes", "not_ready", "version")

    def __init__(self, nodes: list[_Node]) -> None:
        self.nodes = nodes
        self.not_ready = [node for node in nodes if not node.ready]
        self.version = 0


class _View:
    """The Ready candidates of one placement filter, bucketed by how many free GPUs have `memory` bytes.

    Each bucket is a heap of node ids. When a node's count drops, it is pushed into its new bucket and
    its old entry goes stale (dropped when it reaches the top). Counts only drop within a pass, so a
    node is never twice in one bucket.
    """

    def __init__(self, candidates: _Filter, memory: int) -> None:
        self.filter = candidates
        self.memory = memory
        self.count: dict[int, int] = {}
        self.buckets: dict[int, list[int]] = defaultdict(list)
        for node in candidates.nodes:  # in id order, so every bucket starts sorted: a valid heap
            if node.ready:
                count = node.count_usable(memory)
                self.count[node.id] = count
                self.buckets[count].append(node.id)
                node.views.append(self)
        self.top = max(self.buckets, default=0)

    def update(self, node_id: int, count: int) -> None:
        if count != self.count[node_id]:
            self.count[node_id] = count
            heapq.heappush(self.buckets[count], node_id)

    def take(self, count: int, *, limit: int = 1 << 30,
             stop: Callable[[int], bool] | None = None) -> list[int]:
        """Up to `limit` ids of bucket `count`, lowest first, ending early at the first `stop` accepts."""
        heap = self.buckets.get(count)
        if not heap:
            return []
        seen: list[int] = []
        while heap and len(seen) < limit:
            node_id = heapq.heappop(heap)
            if self.count[node_id] != count:
                continue  # stale: the node has moved to a lower bucket for good
            seen.append(node_id)
            if stop is not None and stop(node_id):
                break
        for node_id in seen:
            heapq.heappush(heap, node_id)
        return seen


def _node(node_id: int, name: str, worker: Worker, facts: WorkerObservation | None) -> _Node:
    labels = worker.metadata.labels
    if facts is None or not facts.facts_known:
        return _Node(node_id, name, labels, f"{name} has no facts yet")
    if not facts.ready:
        return _Node(node_id, name, labels, f"{name} is not Ready ({facts.reason or 'no reason given'})")
    node = _Node(node_id, name, labels, "")
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
        self._by_id = [_node(node_id, name, workers[name], observed.get(name))
                       for node_id, name in enumerate(sorted(workers))]
        self._nodes = {node.name: node for node in self._by_id}
        self._per_deployment: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self._filters: dict[FilterKey, _Filter] = {}
        self._views: dict[tuple[FilterKey, int], _View] = {}
        # Why a request shape fits nowhere, with its filter's version then: the same until GPUs change.
        self._reasons: dict[tuple[int, int, FilterKey], tuple[int, str]] = {}

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
            self._per_deployment[deployment][node.id] += 1
        taken = [index for index in gpus if index in node.free]
        for index in taken:
            del node.free[index]
            node.holders[index] = holder
        if taken:
            counts: dict[int, int] = {}  # by memory: views of several filters share it
            for view in node.views:
                view.filter.version += 1
                count = counts.get(view.memory)
                if count is None:
                    count = counts[view.memory] = node.count_usable(view.memory)
                view.update(node.id, count)

    def place(self, request: Request, holder: str, *, prefer: str | None = None) -> Placement | str:
        """A placement, or the reason there is none ("needs 2 GPUs with 24Gi free; gpu-a has 1 free").

        `prefer`: the worker the replica runs on now; it stays there (on its own GPUs first) if it fits.
        """
        if prefer is not None:
            placed = self._place_on(prefer, request, holder)
            if placed is not None:
                return placed
        view = self._view(request)
        node_id = self._spread(view, request) if request.spread else self._binpack(view, request)
        if node_id is None:
            return self._explain(view, request)
        node = self._by_id[node_id]
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
    def _binpack(view: _View, request: Request) -> int | None:
        for count in range(request.gpus, view.top + 1):
            first = view.take(count, limit=1)
            if first:
                return first[0]
        return None

    def _spread(self, view: _View, request: Request) -> int | None:
        replicas = self._per_deployment[request.deployment]
        best: tuple[int, int, int] | None = None
        for count in range(view.top, request.gpus - 1, -1):
            # The first node here without a replica of the deployment is the answer; others are ranked.
            for node_id in view.take(count, stop=lambda node_id: replicas.get(node_id, 0) == 0):
                rank = (replicas.get(node_id, 0), -count, node_id)
                if rank[0] == 0:
                    return node_id
                if best is None or rank < best:
                    best = rank
        return best[2] if best is not None else None

    @staticmethod
    def _matches(request: Request, node: _Node) -> bool:
        if request.workers and node.name not in request.workers:
            return False
        return all(node.labels.get(key) == value for key, value in request.selector)

    def _filter(self, request: Request) -> _Filter:
        candidates = self._filters.get(request.filter_key)
        if candidates is None:
            pool = ([self._nodes[name] for name in request.workers if name in self._nodes] if request.workers
                    else self._by_id)
            nodes = sorted((node for node in pool if self._matches(request, node)), key=lambda node: node.id)
            candidates = self._filters[request.filter_key] = _Filter(nodes)
        return candidates

    def _view(self, request: Request) -> _View:
        key = (request.filter_key, request.gpu_memory)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = _View(self._filter(request), request.gpu_memory)
        return view

    def _explain(self, view: _View, request: Request) -> str:
        key = (request.gpus, request.gpu_memory, request.filter_key)
        known = self._reasons.get(key)
        if known is None or known[0] != view.filter.version:
            known = self._reasons[key] = (view.filter.version, self._reason(view, request))
        return known[1]

    def _reason(self, view: _View, request: Request, limit: int = 4) -> str:
        candidates = view.filter
        if not candidates.nodes:
            if not self._nodes:
                return f"{request.describe()}; no workers are defined"
            return f"{request.describe()}; no worker matches its placement ({request.describe_filter()})"
        closest: list[int] = []  # the closest to fitting first: what a user would free up
        for count in range(view.top, -1, -1):
            closest += view.take(count, limit=limit - len(closest))
            if len(closest) >= limit:
                break
        details = [self._shortfall(self._by_id[node_id], request) for node_id in closest]
        details += [node.status for node in candidates.not_ready[: limit - len(details)]]
        more = len(candidates.nodes) - len(details)
        return f"{request.describe()}; {', '.join(details)}" + (f" and {more} more workers" if more else "")

    @staticmethod
    def _shortfall(node: _Node, request: Request) -> str:
        free = len(node.free)
        if free < request.gpus or not request.gpu_memory:
            return f"{node.name} has {free} free"
        big_enough = node.count_usable(request.gpu_memory)
        memory = format_quantity(request.gpu_memory)
        return f"{node.name} has {free} free but only {big_enough} with {memory} free"
