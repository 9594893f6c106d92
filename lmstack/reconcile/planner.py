"""plan(desired, observed) -> Plan: a pure function, no I/O, the same plan for the same inputs.

Phase 1 reviews every replica that exists: it goes (deployment removed, duplicate, scale down), stays
(noop / update / recreate in place) or must be re-placed (its worker left the manifests or its
placement, it no longer fits its GPUs). Every replica kept reserves its GPUs, healthy ones first (they
win a GPU two replicas claim), so phase 2 places moving replicas, then new ones (biggest first), only
on what is really free. The GPUs of replicas being deleted are free for phase 2.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from lmstack.backends import EffectiveSpec, backend_for, effective_spec, normalize_applied, spec_hash
from lmstack.manifests.loader import DesiredState
from lmstack.manifests.schema import Deployment
from lmstack.reconcile.model import (
    Action,
    ActionKind,
    FieldChange,
    Observed,
    Placement,
    Plan,
    ReplicaObservation,
    Unplaceable,
)
from lmstack.reconcile.scheduler import Request, Scheduler

# Statuses of a replica whose container does not run: it is recreated.
_BROKEN = frozenset({"failed", "missing"})
# Statuses only a pass under way leaves (a pass holds the lock while it runs): seen at the start of a pass,
# the pass that left them was killed, and the replica is adopted (its readiness waited for) or recreated.
_UNSETTLED = frozenset({"pending", "starting", "deleting"})
# How copies of one replica are ordered: see _copy_rank.
_CopyRank = tuple[bool, str, tuple[int, ...], str, str]
# The path of the one change reported when a stored spec no longer validates: always a restart.
_WHOLE_SPEC = "spec"


@dataclass(frozen=True)
class _Desired:
    deployment: Deployment
    request: Request

    @property
    def replicas(self) -> int:
        return self.deployment.spec.replicas

    # Computed on first use: most deployments of a big plan that cannot be placed never need them.
    @cached_property
    def spec(self) -> EffectiveSpec:
        return effective_spec(self.deployment.metadata.name, self.deployment.spec)

    @cached_property
    def stored(self) -> dict[str, Any]:
        """The spec's stored form, which replicas' recorded specs are compared with."""
        return self.spec.to_json()

    @cached_property
    def hash(self) -> str:
        return spec_hash(self.spec)


@dataclass(frozen=True, slots=True)
class _ToPlace:
    desired: _Desired
    ordinal: int
    reason: str
    current: ReplicaObservation | None = None
    changes: tuple[FieldChange, ...] = ()
    # The worker it runs on now: it stays there while it fits there.
    prefer: str | None = None
    # Delete the current replica when no other place is found (its worker left the manifests).
    must_leave: bool = False

    @property
    def holder(self) -> str:
        return f"{self.desired.deployment.name}/{self.ordinal}"

    def order(self) -> tuple[bool, int, int, str, int]:
        # Running replicas first (they keep serving), then first-fit decreasing: biggest requests first.
        request = self.desired.request
        return (self.current is None, -request.gpus, -request.gpu_memory, request.deployment, self.ordinal)


def plan(desired: DesiredState, observed: Observed) -> Plan:
    """Every action that makes `observed` match `desired`, one per replica (noop included), the replicas
    that fit nowhere with the reason, and notes on workers nothing can be placed on."""
    wanted = {name: _Desired(spec, Request.of(spec)) for name, spec in desired.deployments.items()}
    scheduler = Scheduler(desired.workers, observed.workers)
    actions, to_place, kept = _review_existing(observed.replicas, wanted, scheduler)
    to_place += _missing(wanted, kept, observed.replicas)
    unplaceable: list[Unplaceable] = []
    for item in sorted(to_place, key=_ToPlace.order):
        action = _place(item, scheduler, unplaceable)
        if action is not None:
            actions.append(action)
    actions.sort(key=lambda a: (a.deployment, a.replica, a.kind is not ActionKind.DELETE))
    unplaceable.sort(key=lambda u: (u.deployment, u.replica))
    notes = (*_notes(desired, observed), *_download_notes(wanted, actions))
    return Plan(tuple(actions), tuple(unplaceable), notes)


# -- phase 1: the replicas that exist ------------------------------------------------------------


def _review_existing(
    replicas: tuple[ReplicaObservation, ...], wanted: Mapping[str, _Desired], scheduler: Scheduler
) -> tuple[list[Action], list[_ToPlace], dict[str, set[int]]]:
    """Actions for replicas that stay or go, the replicas to re-place, and the ordinals kept."""
    actions: list[Action] = []
    to_place: list[_ToPlace] = []
    kept: dict[str, set[int]] = defaultdict(set)
    observed_count = _distinct_ordinals(replicas)
    for replica in _in_review_order(replicas, wanted):
        target = wanted.get(replica.deployment)
        if target is None:
            actions.append(_delete(replica, "deployment removed from manifests"))
        elif replica.ordinal in kept[replica.deployment]:
            actions.append(_delete(replica, "duplicate of a replica that is kept"))
        elif replica.ordinal >= target.replicas:
            actions.append(_delete(replica, _scale_down_reason(replica, observed_count, target.replicas)))
        else:
            kept[replica.deployment].add(replica.ordinal)
            decision = _review(replica, target, scheduler)
            if isinstance(decision, Action):
                actions.append(decision)
            else:
                to_place.append(decision)
    return actions, to_place, kept


def _in_review_order(replicas: tuple[ReplicaObservation, ...],
                     wanted: Mapping[str, _Desired]) -> list[ReplicaObservation]:
    """Healthy replicas first, then by name: of replicas claiming one GPU, a running one keeps it.

    Copies of one replica (the same ordinal twice) come in a total order, the one to keep first, so
    which is kept never depends on the order the replicas were observed in."""
    copies: dict[tuple[str, int], list[ReplicaObservation]] = defaultdict(list)
    for replica in replicas:
        copies[(replica.deployment, replica.ordinal)].append(replica)
    ranked: list[tuple[bool, str, int, int, ReplicaObservation]] = []
    for (deployment, ordinal), group in copies.items():
        if len(group) > 1:
            target = wanted.get(deployment)
            group.sort(key=lambda replica: _copy_rank(replica, target))
        ranked += [(replica.status in _BROKEN, deployment, ordinal, rank, replica)
                   for rank, replica in enumerate(group)]
    ranked.sort(key=lambda item: item[:4])
    return [item[4] for item in ranked]


def _copy_rank(replica: ReplicaObservation, target: _Desired | None) -> _CopyRank:
    """Up to date before stale, then by worker and GPUs; the rest only breaks ties. (Running before
    broken is the review order's first key.)"""
    stale = target is None or replica.spec != target.stored
    spec = json.dumps(replica.spec, sort_keys=True, default=str)
    return (stale, replica.worker, replica.gpus, replica.status, spec)


def _review(replica: ReplicaObservation, target: _Desired, scheduler: Scheduler) -> Action | _ToPlace:
    holder = f"{replica.deployment}/{replica.ordinal}"
    worker = replica.worker
    changes = tuple(_diff(replica, target))
    if not scheduler.knows(worker):
        return _ToPlace(target, replica.ordinal, f"worker {worker} removed from manifests", replica, changes,
                        must_leave=True)
    # It holds its GPUs until it is replaced; a broken one too, so nothing new is planned onto them.
    scheduler.reserve(holder, replica.deployment, worker, replica.gpus)
    if not scheduler.allows(target.request, worker):
        return _ToPlace(target, replica.ordinal, f"placement no longer allows {worker}", replica, changes)
    if not scheduler.is_ready(worker):
        # Nothing can be checked or done there; moving on a blip would churn. It stays until facts say.
        return _waiting(replica, target, changes, scheduler.status(worker))
    blocker = _resource_blocker(replica, target, holder, scheduler)
    if blocker is not None:
        return _ToPlace(target, replica.ordinal, blocker, replica, changes, prefer=worker)
    return _in_place(replica, target, changes)


def _resource_blocker(replica: ReplicaObservation, target: _Desired, holder: str,
                      scheduler: Scheduler) -> str | None:
    """Why the replica no longer fits the GPUs it has, or None."""
    if len(replica.gpus) != target.request.gpus:
        return f"resources changed: gpus {len(replica.gpus)} -> {target.request.gpus}"
    return scheduler.holds(holder, replica.worker, replica.gpus, target.request.gpu_memory)


def _in_place(replica: ReplicaObservation, target: _Desired, changes: tuple[FieldChange, ...]) -> Action:
    """The action for a replica that stays on its GPUs: recreate, update in place, or nothing."""
    backend = backend_for(target.spec.backend)
    restart = [c for c in changes if c.path == _WHOLE_SPEC or backend.classify(c.path) == "restart"]
    in_place = [c for c in changes if c.path != _WHOLE_SPEC and backend.classify(c.path) == "in-place"]
    if replica.status in _BROKEN:
        kind, reason = ActionKind.RECREATE, f"container {replica.status}"
    elif any(c.path == _WHOLE_SPEC for c in restart):
        kind, reason = ActionKind.RECREATE, "the spec it was created with no longer validates"
    elif restart:
        kind, reason = ActionKind.RECREATE, "spec changed: " + _paths(restart)
    elif replica.status in _UNSETTLED:
        current = Placement(replica.worker, replica.gpus)
        reason = (f"left {replica.status} by a pass that stopped: wait for readiness (recreate if it does not "
                  "become ready)")
        if in_place:
            reason += "; changed in place: " + _paths(in_place)
        return Action(ActionKind.UPDATE, replica.deployment, replica.ordinal, reason, current, current, changes,
                      target.hash, adopt=True)
    elif in_place:
        kind, reason = ActionKind.UPDATE, "changed in place: " + _paths(in_place)
    elif changes:
        kind, reason = ActionKind.NOOP, "up to date; controller settings changed: " + _paths(list(changes))
    else:
        kind, reason = ActionKind.NOOP, "up to date"
    current = Placement(replica.worker, replica.gpus)
    return Action(kind, replica.deployment, replica.ordinal, reason, current, current, changes, target.hash)


def _waiting(replica: ReplicaObservation, target: _Desired, changes: tuple[FieldChange, ...],
             why: str) -> Action:
    """A replica on a worker that is not Ready (or has no facts): kept as it is, whatever it needs."""
    pending = _in_place(replica, target, changes)
    if pending.kind is ActionKind.NOOP:
        reason = f"kept: {why}"
    else:
        reason = f"{pending.reason}; cannot {pending.kind.value} while {why}"
    current = Placement(replica.worker, replica.gpus)
    return Action(ActionKind.NOOP, replica.deployment, replica.ordinal, reason, current, current, changes,
                  target.hash)


def _distinct_ordinals(replicas: tuple[ReplicaObservation, ...]) -> dict[str, int]:
    ordinals: dict[str, set[int]] = defaultdict(set)
    for replica in replicas:
        ordinals[replica.deployment].add(replica.ordinal)
    return {name: len(values) for name, values in ordinals.items()}


def _scale_down_reason(replica: ReplicaObservation, observed_count: Mapping[str, int], replicas: int) -> str:
    count = observed_count[replica.deployment]
    if count > replicas:
        return f"scale down {count} -> {replicas}"
    return f"ordinal {replica.ordinal} is out of range for replicas: {replicas} (a lower one replaces it)"


def _delete(replica: ReplicaObservation, reason: str) -> Action:
    return Action(ActionKind.DELETE, replica.deployment, replica.ordinal, reason, None,
                  Placement(replica.worker, replica.gpus))


# -- phase 2: placing --------------------------------------------------------------------------


def _missing(wanted: Mapping[str, _Desired], kept: Mapping[str, set[int]],
             replicas: tuple[ReplicaObservation, ...]) -> list[_ToPlace]:
    """The ordinals below `replicas` that no observed replica has, for every deployment."""
    observed = {replica.deployment for replica in replicas}
    items = []
    for name in sorted(wanted):
        target = wanted[name]
        have = kept.get(name, set())
        reason = f"scale up {len(have)} -> {target.replicas}" if name in observed else "new replica"
        items += [_ToPlace(target, n, reason) for n in range(target.replicas) if n not in have]
    return items


def _place(item: _ToPlace, scheduler: Scheduler, unplaceable: list[Unplaceable]) -> Action | None:
    name = item.desired.deployment.name
    current = item.current
    previous = Placement(current.worker, current.gpus) if current is not None else None
    result = scheduler.place(item.desired.request, item.holder, prefer=item.prefer)
    if isinstance(result, str):
        unplaceable.append(Unplaceable(name, item.ordinal, result))
        if current is None:
            return None
        if item.must_leave:
            return _delete(current, f"{item.reason}; no other worker can take it")
        # Never stop a running replica without a replacement: it keeps serving where it is.
        reason = f"should move ({item.reason}) but cannot: {result}"
        return Action(ActionKind.NOOP, name, item.ordinal, reason, previous, previous, item.changes,
                      item.desired.hash)
    kind = ActionKind.CREATE if current is None else ActionKind.RECREATE
    reason = item.reason
    if previous is not None and previous.worker != result.worker:
        reason = f"{reason}; moving from {previous.worker}"
    return Action(kind, name, item.ordinal, reason, result, previous, item.changes, item.desired.hash)


# -- field diff ----------------------------------------------------------------------------------


def _diff(replica: ReplicaObservation, target: _Desired) -> list[FieldChange]:
    """What differs between the spec the replica was made from and the desired one (`replicas` aside), in the
    stored form: the paths and values a plan shows and stores.

    The stored spec is re-read with today's defaults first, so a default never looks like a change."""
    if replica.spec == target.stored:
        return []  # the common case, and cheap
    applied = normalize_applied(replica.deployment, replica.spec)
    if applied is None:
        return [FieldChange(_WHOLE_SPEC, "(no longer valid)", "(current spec)")]
    return [change for change in _flat_diff(applied.to_json(), target.stored, "") if change.path != "replicas"]


def _flat_diff(old: Any, new: Any, prefix: str) -> Iterator[FieldChange]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            yield from _flat_diff(old.get(key), new.get(key), path)
    elif old != new:
        yield FieldChange(prefix, old, new)


def _paths(changes: list[FieldChange]) -> str:
    return ", ".join(change.path for change in changes)


# -- notes ---------------------------------------------------------------------------------------


def _notes(desired: DesiredState, observed: Observed) -> Iterator[str]:
    workers = observed.workers
    unknown = [name for name in sorted(desired.workers)
               if name not in workers or not workers[name].facts_known]
    if unknown:
        yield f"facts unknown for {_names(unknown)}: nothing is placed there until node facts are gathered"
    not_ready = [f"{name} ({workers[name].reason or 'no reason given'})" for name in sorted(desired.workers)
                 if name in workers and workers[name].facts_known and not workers[name].ready]
    if not_ready:
        yield f"not Ready: {_names(not_ready)}: nothing new is placed there"


def _download_notes(wanted: Mapping[str, _Desired], actions: list[Action]) -> Iterator[str]:
    """One note per deployment whose new containers need a model file fetched into the model cache."""
    starting = sorted({action.deployment for action in actions
                       if action.kind in (ActionKind.CREATE, ActionKind.RECREATE) and action.deployment in wanted})
    for name in starting:
        spec = wanted[name].spec
        download = backend_for(spec.backend).model_download(spec)
        if download is not None:
            yield (f"{name}: the model {download.source} must be fetched into each worker's model cache first "
                   f"({download.path}): `lmstack prepare` downloads it where it is missing")


def _names(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
