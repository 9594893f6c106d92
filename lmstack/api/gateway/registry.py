"""Ready replicas by served model name, for the gateway to route to.

The table of replicas is re-read from the database every `refresh_s` (in a thread, off the event loop);
requests never touch the database. Only `ready` replicas are routed to: the reconciler marks a replica
`draining` and waits at least `refresh_s` (its `route_refresh_s`) before it waits out the requests in flight
and stops it, so no new request is sent to a replica about to stop.

What the gateway learns while serving — requests in flight, failures — lives in a `ReplicaLoad` per replica,
kept across refreshes for as long as the replica stays Ready at the same endpoint.

Choosing a replica: a request with a long prompt goes to the replica that served its beginning lately, within
a bounded share of the load (gateway/affinity.py). Otherwise "power of two choices": two Ready replicas at
random, the one with fewer requests in flight wins. It spreads load nearly as well as least-loaded without
every server herding onto the same replica, and costs O(1). A replica that just failed (connect error,
timeout, 5xx) is suspect for `suspect_s` seconds: it is skipped while any other replica of the model is not.
So is a replica on a worker the controller's last pass could not reach (its facts failed, or its containers
could not be listed), until a pass reaches it again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence, Set
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from lmstack.api.gateway.affinity import PrefixTable, rendezvous
from lmstack.api.services.metrics import MetricsRecorder
from lmstack.backends import backend_for, normalize_applied
from lmstack.state import Database, Deployment, Replica, Worker

log = logging.getLogger("lmstack.api.registry")

ReplicaKey = tuple[str, int, str]  # deployment, ordinal, endpoint: a replica moved elsewhere starts afresh
# A replica that served a prompt's beginning takes the request while it holds at most this times its share of
# the requests in flight (bounded-load consistent hashing's 1 + epsilon; 1.25 is the usual choice).
BOUND = 1.25


@dataclass
class ReplicaLoad:
    """What the gateway knows about a replica from serving it (mutated on the event loop only)."""

    outstanding: int = 0  # requests in flight now
    requests: int = 0  # requests sent since this process first saw the replica
    failures: int = 0  # of those, how many failed before or during the answer
    suspect_until: float = 0.0  # monotonic time; skipped until then when another replica is available


@dataclass(frozen=True)
class Target:
    """One Ready replica as the gateway routes to it."""

    served_name: str
    upstream_model: str  # the `model` to send the engine (the backend's upstream_model of the replica's spec)
    endpoint: str  # base URL, e.g. http://10.0.0.5:18000
    deployment: str
    ordinal: int
    worker: str
    load: ReplicaLoad = field(compare=False, repr=False)
    revision: str | None = None  # the commit the replica was created from: what usage records say served it
    # The engine's API key as a request header (empty when the engine has none): only the gateway holds it.
    auth: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    worker_down: bool = False  # the last pass could not reach its worker

    @property
    def key(self) -> ReplicaKey:
        return (self.deployment, self.ordinal, self.endpoint)

    @property
    def name(self) -> str:
        return f"{self.deployment}/{self.ordinal}"


@dataclass
class GatewayCounters:
    """Process-wide gateway counters, for the metrics endpoint to read (plain ints: no locking on the loop)."""

    retries: int = 0  # requests sent to a second replica after the first failed before answering
    reconnects: int = 0  # requests sent again on a new connection: the engine closed the kept-alive one
    upstream_failures: Counter[str] = field(default_factory=Counter)  # by kind: connect, timeout, status, stream
    client_disconnects: int = 0  # clients that went away before their answer was complete
    refresh_failures: int = 0  # registry refreshes that could not read the database


class ReplicasUnavailable(Exception):
    """The replicas could not be read (from the hub, for a server of several processes)."""


@dataclass(frozen=True)
class Row:
    """A Ready replica as read from the database, its spec read down to the two names the gateway needs."""

    deployment: str
    ordinal: int
    worker: str
    endpoint: str
    served_name: str
    upstream_model: str
    created_at: datetime
    engine_key: str | None
    revision: str | None
    worker_down: bool


@dataclass(frozen=True)
class Snapshot:
    replicas: list[Row]
    served_names: set[str]


class Registry:
    def __init__(self, database: Database, *, refresh_s: float, metrics: MetricsRecorder, suspect_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, prefix_routing: bool = True,
                 read: Callable[[], Awaitable[Snapshot]] | None = None) -> None:
        self.database = database
        # Where the replicas come from: this process's own query, or (several server processes) the one query the
        # supervisor makes for all of them (api/hub).
        self._read_replicas = read or (lambda: asyncio.to_thread(self.read))
        # Requests with a long prompt go where its beginning was served lately (gateway/affinity.py).
        self.prefixes: PrefixTable | None = PrefixTable() if prefix_routing else None
        self.refresh_s = refresh_s
        self.metrics = metrics
        self.suspect_s = suspect_s
        self.counters = GatewayCounters()
        self._clock = clock
        self._targets: dict[str, tuple[Target, ...]] = {}
        self._created: dict[str, int] = {}  # served name -> unix time its oldest Ready replica was created
        self._known: frozenset[str] = frozenset()  # every served name of a deployment or a Ready replica
        self._loads: dict[ReplicaKey, ReplicaLoad] = {}
        # (deployment, ordinal) -> (the stored spec, its served name, its upstream model): a spec is read once,
        # not on every refresh (only in the refresh's thread).
        self._names: dict[tuple[str, int], tuple[dict[str, Any], str, str]] = {}
        self.refreshed_at: float | None = None  # monotonic time of the last successful refresh
        self.refresh_error: str | None = None  # why the last refresh failed; None when it succeeded

    # -- refreshing ------------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read Ready replicas. When the database cannot be read, the last known replicas stay in use."""
        try:
            snapshot = await self._read_replicas()
        except (SQLAlchemyError, ReplicasUnavailable) as exc:
            self.counters.refresh_failures += 1
            if self.refresh_error is None:
                log.warning("cannot read replicas from the database; routing to the last known ones: %s",
                            " ".join(str(exc).split())[:500])
            self.refresh_error = str(exc)
            return
        if self.refresh_error is not None:
            log.warning("reading replicas from the database again")
        self.refresh_error = None
        self._apply(snapshot)
        self.refreshed_at = self._clock()

    async def run(self) -> None:
        """Refresh every `refresh_s` until cancelled."""
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    def read(self) -> Snapshot:
        """The Ready replicas, the served names and the workers down, from the database. Blocking."""
        with self.database.session() as session:
            rows = session.execute(
                select(Replica.deployment_name, Replica.ordinal, Replica.worker_name, Replica.endpoint,
                       Replica.spec, Replica.created_at, Replica.engine_key, Replica.revision)
                .where(Replica.status == "ready", Replica.endpoint.is_not(None))
                .order_by(Replica.deployment_name, Replica.ordinal)
            ).all()
            names = set(session.scalars(select(Deployment.served_name)).all())
            down = {name for name, conditions in session.execute(select(Worker.name, Worker.conditions))
                    if _unreachable(conditions)}
        replicas = []
        known: dict[tuple[str, int], tuple[dict[str, Any], str, str]] = {}
        for deployment, ordinal, worker, endpoint, stored, created_at, engine_key, revision in rows:
            spec = dict(stored or {})
            cached = self._names.get((deployment, ordinal))
            if cached is None or cached[0] != spec:
                cached = (spec, *_model_names(deployment, spec))
            known[(deployment, ordinal)] = cached
            replicas.append(Row(deployment, ordinal, worker, str(endpoint), cached[1], cached[2], created_at,
                                 engine_key, revision, worker in down))
        self._names = known
        return Snapshot(replicas=replicas, served_names=names)

    def _apply(self, snapshot: Snapshot) -> None:
        targets: dict[str, list[Target]] = {}
        created: dict[str, int] = {}
        loads: dict[ReplicaKey, ReplicaLoad] = {}
        for row in snapshot.replicas:
            served = row.served_name
            key = (row.deployment, row.ordinal, row.endpoint.rstrip("/"))
            load = loads[key] = self._loads.get(key) or ReplicaLoad()
            targets.setdefault(served, []).append(Target(
                served_name=served, upstream_model=row.upstream_model, endpoint=key[2],
                deployment=row.deployment, ordinal=row.ordinal, worker=row.worker, load=load, revision=row.revision,
                auth={"authorization": f"Bearer {row.engine_key}"} if row.engine_key else {},
                worker_down=row.worker_down))
            stamp = int(row.created_at.timestamp())
            created[served] = min(created.get(served, stamp), stamp)
        # Requests in flight on a replica that just left keep their (now unreferenced) load object.
        self._loads = loads
        self._targets = {name: tuple(found) for name, found in targets.items()}
        self._created = created
        self._known = frozenset(snapshot.served_names | set(targets))

    # -- routing ---------------------------------------------------------------------------------------

    def knows(self, model: str) -> bool:
        """Whether `model` is the served name of a deployment (Ready or not)."""
        return model in self._known

    def targets(self, model: str) -> tuple[Target, ...]:
        return self._targets.get(model, ())

    def models(self) -> list[tuple[str, int]]:
        """(served name, created) for every model with at least one Ready replica, sorted by name."""
        return sorted((name, self._created.get(name, 0)) for name, found in self._targets.items() if found)

    def pick(self, model: str, exclude: Set[ReplicaKey] = frozenset(), prefix: Sequence[int] = ()) -> Target | None:
        """A Ready replica for `model`; None if there is none. `prefix`: the prompt's keys (affinity.prompt_keys).

        Replicas in `exclude` (already tried for this request) are never chosen; suspect ones, and those on a
        worker the last pass could not reach, only when nothing else is left. Of the others: the one that served
        the prompt's beginning lately, unless it holds more than its share of the requests in flight; else
        power of two choices on requests in flight.
        """
        candidates = [t for t in self._targets.get(model, ()) if t.key not in exclude]
        if len(candidates) > 1:
            candidates = [t for t in candidates if not t.worker_down] or candidates
            now = self._clock()
            healthy = [t for t in candidates if t.load.suspect_until <= now]
            candidates = healthy or candidates
        if not candidates:
            return None
        chosen = candidates[0] if len(candidates) == 1 else (
            self._affine(candidates, prefix) or _two_choices(candidates))
        if prefix and self.prefixes is not None:
            self.prefixes.remember(prefix, chosen.key)
        return chosen

    def _affine(self, candidates: list[Target], prefix: Sequence[int]) -> Target | None:
        """The candidate that served the prompt's beginning lately, if it is within its bounded load: at most
        ceil(BOUND × (requests in flight + 1) / candidates) in flight with this one. For a beginning none served
        lately: the one it hashes to (affinity.rendezvous), if no other has fewer requests in flight."""
        if not prefix or self.prefixes is None:
            return None
        served = self.prefixes.lookup(prefix)
        if served is None:
            own = max(candidates, key=lambda t: rendezvous(prefix[0], t.name))
            return own if own.load.outstanding <= min(t.load.outstanding for t in candidates) else None
        for target in candidates:
            if target.key == served:
                in_flight = sum(t.load.outstanding for t in candidates) + 1
                if target.load.outstanding + 1 <= math.ceil(BOUND * in_flight / len(candidates)):
                    return target
                return None
        return None

    def failed(self, target: Target, kind: str) -> None:
        """`target` failed a request (before or during its answer): counted by `kind` (connect, timeout, status,
        stream) and suspect for `suspect_s` seconds."""
        self.counters.upstream_failures[kind] += 1
        self.metrics.upstream_failed(target.served_name, kind)
        load = target.load
        load.failures += 1
        now = self._clock()
        if load.suspect_until <= now:
            log.warning("replica %s of %s at %s failed; avoiding it for %.0fs", target.name, target.served_name,
                        target.endpoint, self.suspect_s)
        load.suspect_until = now + self.suspect_s

    def succeeded(self, target: Target) -> None:
        target.load.suspect_until = 0.0

    def snapshot(self) -> list[dict[str, Any]]:
        """Every Ready replica with its load, for status and metrics."""
        now = self._clock()
        return [{"model": t.served_name, "replica": t.name, "worker": t.worker, "endpoint": t.endpoint,
                 "outstanding": t.load.outstanding, "requests": t.load.requests, "failures": t.load.failures,
                 "suspect": t.load.suspect_until > now, "worker_down": t.worker_down}
                for found in self._targets.values() for t in found]


def _model_names(deployment: str, stored: dict[str, Any]) -> tuple[str, str]:
    """The replica's served name and the `model` its engine answers to, from the spec it was created with."""
    spec = normalize_applied(deployment, stored)
    if spec is None:  # not a spec lmstack stored (or one that no longer validates): the deployment's name
        return deployment, deployment
    return spec.served_name, backend_for(spec.backend).upstream_model(spec)



# Conditions (reconcile.records) that say the last pass could not reach a worker: its facts could not be
# gathered (Ready False: FactsFailed), or its containers could not be listed (Degraded: ContainersNotListed).
_DOWN = {("Ready", "False", "FactsFailed"), ("Degraded", "True", "ContainersNotListed")}


def _two_choices(candidates: list[Target]) -> Target:
    first, second = random.sample(candidates, 2)
    return second if second.load.outstanding < first.load.outstanding else first


def _unreachable(conditions: object) -> bool:
    return isinstance(conditions, list) and any(
        isinstance(c, dict) and (c.get("type"), c.get("status"), c.get("reason")) in _DOWN for c in conditions)
