"""plan(desired, observed) -> Plan: a pure function, no I/O, the same plan for the same inputs.

Phase 1 reviews every replica that exists: it goes (deployment removed, duplicate, scale down), stays
(noop / update / recreate in place) or must be re-placed (its worker left the manifests or its
placement, it no longer fits its GPUs). Every replica kept reserves its GPUs, healthy ones first (they
win a GPU two replicas claim), so phase 2 places moving replicas, then new ones (biggest first), only
on what is really free. The GPUs of replicas being deleted are free for phase 2. A serving replica that
moves (to another worker, or to GPUs of its own worker it does not hold) is replaced by surge: it serves
until its replacement is Ready, then it is drained and removed.

Ordinals name replicas; they are not positions. A deployment of `replicas: N` keeps N of its replicas
(serving and up to date first, then the lowest ordinals) and a new replica takes the lowest ordinal its
deployment does not use. So a replica replaced by surge (phase 3) keeps its new ordinal for good.

Phase 3 rolls out restarts of serving replicas, after everything else is placed (a replica that must run
wins a GPU over a twin that runs for a minute): a surge, the new replica on a free GPU (for `gpus: 0`, any
Ready worker) beside the old one, which is drained and removed once the new one is Ready; else, within
`rollout.maxUnavailable`, the old one is drained and stopped first, and the plan says when that leaves a
deployment with no replica serving.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
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
_UNSETTLED = frozenset({"pending", "starting", "deleting", "draining"})
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


def plan(desired: DesiredState, observed: Observed, *, prune: bool = True) -> Plan:
    """Every action that makes `observed` match `desired`, one per replica (noop included), the replicas
    that fit nowhere with the reason, and notes on workers nothing can be placed on. `prune`: delete the
    replicas of deployments removed from the manifests (False: they are kept, and keep their GPUs)."""
    wanted = {name: _Desired(spec, Request.of(spec)) for name, spec in desired.deployments.items()}
    scheduler = Scheduler(desired.workers, observed.workers)
    actions, to_place, kept, rolling = _review_existing(observed.replicas, wanted, scheduler, prune=prune)
    to_place += _missing(wanted, kept, observed.replicas)
    unplaceable: list[Unplaceable] = []
    moves: list[Action] = []
    for item in sorted(to_place, key=_ToPlace.order):
        action = _place(item, scheduler, unplaceable)
        if action is None:
            continue
        if _serving_move(item, action, scheduler):
            moves.append(action)
        else:
            actions.append(action)
    used = _used_ordinals(observed.replicas, [*actions, *moves])
    actions += [_surge_move(action, used[action.deployment]) for action in moves]
    rolled = [_roll(action, wanted[action.deployment], scheduler, used[action.deployment], unplaceable)
              for action in sorted(rolling, key=lambda a: (a.deployment, a.replica))]
    actions += rolled
    actions.sort(key=lambda a: (a.deployment, a.replica, a.kind is not ActionKind.DELETE))
    unplaceable.sort(key=lambda u: (u.deployment, u.replica))
    downtime = tuple(_downtime(wanted, observed.replicas, rolled))
    unpruned = sorted({a.deployment for a in actions if a.kind is ActionKind.NOOP and a.reason.startswith(_UNPRUNED)})
    notes = (*_notes(desired, observed), *_download_notes(wanted, actions),
             *(f"{name}: down during this change: {why}" for name, why in downtime),
             *([f"pruning is off: {', '.join(unpruned)} removed from the manifests but kept running"]
               if unpruned else []))
    return Plan(tuple(actions), tuple(unplaceable), notes, downtime)


# -- phase 1: the replicas that exist ------------------------------------------------------------


def _review_existing(
    replicas: tuple[ReplicaObservation, ...], wanted: Mapping[str, _Desired], scheduler: Scheduler, *,
    prune: bool = True,
) -> tuple[list[Action], list[_ToPlace], dict[str, set[int]], list[Action]]:
    """Actions for replicas that stay or go, the replicas to re-place, the ordinals kept, and the serving
    replicas to restart in place (phase 3 decides how)."""
    actions: list[Action] = []
    to_place: list[_ToPlace] = []
    rolling: list[Action] = []
    kept: dict[str, set[int]] = defaultdict(set)
    observed_count = _distinct_ordinals(replicas)
    keep = _to_keep(replicas, wanted)
    for replica in _in_review_order(replicas, wanted):
        target = wanted.get(replica.deployment)
        if target is None and not prune:
            actions.append(_unpruned(replica, scheduler))
        elif target is None:
            actions.append(_delete(replica, "deployment removed from manifests"))
        elif replica.ordinal in kept[replica.deployment]:
            actions.append(_delete(replica, "duplicate of a replica that is kept"))
        elif replica.ordinal not in keep[replica.deployment]:
            actions.append(_delete(replica, _scale_down_reason(replica, observed_count, target.replicas)))
        else:
            kept[replica.deployment].add(replica.ordinal)
            decision = _review(replica, target, scheduler)
            if isinstance(decision, _ToPlace):
                to_place.append(decision)
            elif decision.kind is ActionKind.RECREATE and replica.status == "ready":
                rolling.append(decision)
            else:
                actions.append(decision)
    return actions, to_place, kept, rolling


def _to_keep(replicas: tuple[ReplicaObservation, ...], wanted: Mapping[str, _Desired]) -> dict[str, set[int]]:
    """The ordinals each deployment keeps: all of them up to `replicas`; beyond that, serving before not, up
    to date before stale, then the lowest (a pass stopped half way through a surge left both the old replica
    and its Ready replacement: the replacement stays)."""
    by_ordinal: dict[str, dict[int, list[ReplicaObservation]]] = defaultdict(lambda: defaultdict(list))
    for replica in replicas:
        if replica.deployment in wanted:
            by_ordinal[replica.deployment][replica.ordinal].append(replica)
    keep: dict[str, set[int]] = defaultdict(set)
    for name, ordinals in by_ordinal.items():
        target = wanted[name]
        if len(ordinals) <= target.replicas:
            keep[name] = set(ordinals)
            continue

        def rank(ordinal: int, target: _Desired = target,
                 ordinals: Mapping[int, list[ReplicaObservation]] = ordinals) -> tuple[bool, bool, bool, int]:
            best = min((replica.status in _BROKEN, replica.status != "ready", bool(_restart_changes(replica, target)))
                       for replica in ordinals[ordinal])
            return (*best, ordinal)

        keep[name] = set(sorted(ordinals, key=rank)[: target.replicas])
    return keep


def _restart_changes(replica: ReplicaObservation, target: _Desired) -> list[FieldChange]:
    backend = backend_for(target.spec.backend)
    return [c for c in _diff(replica, target) if c.path == _WHOLE_SPEC or backend.classify(c.path) == "restart"]


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
    return f"scale down {observed_count[replica.deployment]} -> {replicas}"


_UNPRUNED = "deployment removed from manifests; kept: pruning is off"


def _unpruned(replica: ReplicaObservation, scheduler: Scheduler) -> Action:
    """A replica of a removed deployment, kept because pruning is off: it keeps its GPUs."""
    scheduler.reserve(f"{replica.deployment}/{replica.ordinal}", replica.deployment, replica.worker, replica.gpus)
    current = Placement(replica.worker, replica.gpus)
    return Action(ActionKind.NOOP, replica.deployment, replica.ordinal, f"{_UNPRUNED} (LMSTACK_PRUNE=false)",
                  current, current)


def _delete(replica: ReplicaObservation, reason: str) -> Action:
    return Action(ActionKind.DELETE, replica.deployment, replica.ordinal, reason, None,
                  Placement(replica.worker, replica.gpus))


# -- phase 2: placing --------------------------------------------------------------------------


def _missing(wanted: Mapping[str, _Desired], kept: Mapping[str, set[int]],
             replicas: tuple[ReplicaObservation, ...]) -> list[_ToPlace]:
    """The replicas each deployment lacks, on the lowest ordinals none of its observed replicas has (one being
    deleted in this pass included: its row lasts until its container is gone)."""
    observed: dict[str, set[int]] = defaultdict(set)
    for replica in replicas:
        observed[replica.deployment].add(replica.ordinal)
    items = []
    for name in sorted(wanted):
        target = wanted[name]
        have = kept.get(name, set())
        reason = f"scale up {len(have)} -> {target.replicas}" if name in observed else "new replica"
        taken = set(observed.get(name, ()))
        for _ in range(target.replicas - len(have)):
            ordinal = _lowest_free(taken)
            taken.add(ordinal)
            items.append(_ToPlace(target, ordinal, reason))
    return items


def _lowest_free(taken: set[int]) -> int:
    ordinal = 0
    while ordinal in taken:
        ordinal += 1
    return ordinal


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


def _serving_move(item: _ToPlace, action: Action, scheduler: Scheduler) -> bool:
    """A serving replica re-placed where it can run beside itself (another worker, or other GPUs of its own):
    it keeps serving until its replacement is Ready, then is drained (a move is a surge). On a worker that is
    not Ready there is nothing to drain, and its replacement takes its place at once."""
    current, placed = item.current, action.placement
    if current is None or placed is None or action.kind is not ActionKind.RECREATE or current.status != "ready":
        return False
    if not scheduler.is_ready(current.worker):
        return False
    return placed.worker != current.worker or not set(placed.gpus) & set(current.gpus)


def _surge_move(action: Action, used: set[int]) -> Action:
    ordinal = _lowest_free(used)
    used.add(ordinal)
    return replace(action, surge=ordinal,
                   reason=f"{action.reason}; surge: {action.deployment}/{ordinal} starts on {action.placement} "
                          f"first, then {action.replica_name} is drained and removed")


# -- phase 3: rolling out restarts ----------------------------------------------------------------


def _used_ordinals(replicas: tuple[ReplicaObservation, ...], actions: list[Action]) -> dict[str, set[int]]:
    used: dict[str, set[int]] = defaultdict(set)
    for replica in replicas:
        used[replica.deployment].add(replica.ordinal)
    for action in actions:
        used[action.deployment].add(action.replica)
    return used


def _roll(action: Action, target: _Desired, scheduler: Scheduler, used: set[int],
          unplaceable: list[Unplaceable]) -> Action:
    """A serving replica that needs a restart: by surge when a new replica fits beside it, else stopped first
    (within rollout.maxUnavailable), else it waits."""
    current = action.previous
    assert current is not None
    name = action.deployment
    ordinal = _lowest_free(used)
    placed = scheduler.place(target.request, f"{name}/{ordinal}", prefer=current.worker)
    if isinstance(placed, Placement):
        used.add(ordinal)
        return replace(action, placement=placed, surge=ordinal,
                       reason=f"{action.reason}; surge: {name}/{ordinal} starts on {placed} first, then "
                              f"{action.replica_name} is drained and removed")
    if target.deployment.spec.rollout.max_unavailable == 0:
        why = (f"no room to start its replacement beside it ({placed}) and rollout.maxUnavailable is 0; set "
               "spec.rollout.maxUnavailable: 1 to restart it in place (it is down meanwhile)")
        unplaceable.append(Unplaceable(name, action.replica, f"cannot roll out: {why}"))
        return replace(action, kind=ActionKind.NOOP, reason=f"{action.reason}; cannot roll out: {why}")
    return replace(action, reason=f"{action.reason}; drained and stopped first: no room to start its "
                                  f"replacement beside it ({placed})")


def _downtime(wanted: Mapping[str, _Desired], replicas: tuple[ReplicaObservation, ...],
              rolled: list[Action]) -> Iterator[tuple[str, str]]:
    """Deployments left with no replica serving while replicas stop before their replacements are ready:
    at most rollout.maxUnavailable of them are down at once, out of those serving now."""
    stopping: dict[str, list[Action]] = defaultdict(list)
    for action in rolled:
        if action.kind is ActionKind.RECREATE and action.surge is None:
            stopping[action.deployment].append(action)
    for name in sorted(stopping):
        target = wanted[name]
        serving = len({r.ordinal for r in replicas if r.deployment == name and r.status == "ready"})
        lanes = target.deployment.spec.rollout.max_unavailable
        if serving - min(len(stopping[name]), lanes) <= 0:
            names = ", ".join(action.replica_name for action in stopping[name])
            yield name, (f"{names} stopped before the replacement is ready (no room to start one beside it; "
                         f"rollout.maxUnavailable: {lanes})")


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
