"""Properties every plan has, on random small fleets (the hand-worked cases are in tests/plans/).

- the same inputs, in any order, give the same plan (even with replicas claiming one GPU);
- no GPU is given to two replicas (when no two observed replicas claimed one);
- every new placement is on a Ready worker the placement allows, on GPUs lmstack may use, with
  the GPU count and the memory the deployment asks for;
- every deployment ends with exactly its ordinals 0..replicas-1, each running or reported unplaceable;
- nothing is changed on a worker that is not Ready;
- a healthy, up-to-date replica that still fits where it is stays there (noop).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.backends import effective_spec
from lmstack.manifests.loader import DesiredState
from lmstack.manifests.schema import Deployment, Worker
from lmstack.reconcile.model import ActionKind, GpuFacts, Observed, Plan, ReplicaObservation, WorkerObservation
from lmstack.reconcile.planner import plan

GiB = 2**30
WORKERS = ("gpu-a", "gpu-b", "gpu-c", "gpu-d")


@st.composite
def fleets(draw: st.DrawFn, conflicts: bool = False) -> tuple[DesiredState, Observed]:
    workers: dict[str, Worker] = {}
    facts: dict[str, WorkerObservation] = {}
    for name in WORKERS[: draw(st.integers(0, len(WORKERS)))]:
        count = draw(st.integers(0, 4))
        allowed = draw(st.one_of(st.just("all"), st.lists(st.integers(0, 3), unique=True, max_size=4)))
        labels = {"rack": draw(st.sampled_from(("r1", "r2")))}
        workers[name] = Worker.model_validate({"apiVersion": "lmstack.dev/v1", "kind": "Worker",
                                               "metadata": {"name": name, "labels": labels},
                                               "spec": {"host": name, "gpus": allowed}})
        state = draw(st.sampled_from(("ready", "ready", "ready", "not-ready", "unknown")))
        if state == "ready":
            gpus = tuple(GpuFacts(index, 80 * GiB, draw(st.sampled_from((0, 0, 40 * GiB, 70 * GiB))))
                         for index in range(count))
            facts[name] = WorkerObservation(name, facts_known=True, ready=True, gpus=gpus)
        elif state == "not-ready":
            facts[name] = WorkerObservation(name, facts_known=True, ready=False, reason="unreachable")
    deployments: dict[str, Deployment] = {}
    for name in ("alpha", "beta", "gamma")[: draw(st.integers(0, 3))]:
        deployments[name] = _deployment(draw, name, list(workers))
    desired = DesiredState(workers=workers, deployments=deployments, origins={})
    return desired, Observed(workers=facts, replicas=tuple(draw(_replicas(desired, facts, conflicts))))


def _deployment(draw: st.DrawFn, name: str, workers: list[str]) -> Deployment:
    gpus = draw(st.integers(0, 3))
    placement: dict[str, Any] = {"strategy": draw(st.sampled_from(("binpack", "spread")))}
    choice = draw(st.sampled_from(("any", "any", "selector", "workers")))
    if choice == "selector":
        placement["selector"] = {"rack": "r1"}
    elif choice == "workers" and workers:
        placement["workers"] = draw(st.lists(st.sampled_from(workers), min_size=1, max_size=2, unique=True))
    resources: dict[str, Any] = {"gpus": gpus}
    if gpus and draw(st.booleans()):
        resources["gpuMemory"] = draw(st.sampled_from(("24Gi", "60Gi")))
    return Deployment.model_validate({
        "apiVersion": "lmstack.dev/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"backend": "ollama" if gpus == 0 else draw(st.sampled_from(("vllm", "sglang", "ollama"))),
                 "model": "m", "replicas": draw(st.integers(0, 3)), "resources": resources,
                 "placement": placement, "args": draw(st.sampled_from(([], ["--x"])))},
    })


@st.composite
def _replicas(draw: st.DrawFn, desired: DesiredState, facts: dict[str, WorkerObservation],
              conflicts: bool) -> list[ReplicaObservation]:
    """Replicas as a previous plan may have left them: no GPU claimed twice unless `conflicts`."""
    taken: set[tuple[str, int]] = set()
    replicas = []
    names = [*desired.deployments, "removed"]
    for _ in range(draw(st.integers(0, 6))):
        deployment = draw(st.sampled_from(names))
        worker = draw(st.sampled_from([*desired.workers, "gone"]))
        present = [gpu.index for gpu in facts[worker].gpus] if worker in facts else [0, 1, 2, 3]
        free = [index for index in present if conflicts or (worker, index) not in taken]
        gpus = tuple(sorted(draw(st.lists(st.sampled_from(free), unique=True, max_size=3)))) if free else ()
        taken.update((worker, index) for index in gpus)
        spec = (effective_spec(deployment, desired.deployments[deployment].spec).to_json()
                if deployment in desired.deployments else
                {"backend": "vllm", "model": "m", "resources": {"gpus": len(gpus)}})
        if draw(st.booleans()):
            spec = {**spec, "args": ["--old"]}
        replicas.append(ReplicaObservation(deployment, draw(st.integers(0, 3)), worker, gpus, spec,
                                           draw(st.sampled_from(("ready", "ready", "failed", "missing")))))
    return replicas


def _placed(result: Plan) -> list[tuple[str, str, int]]:
    return [(action.replica_name, action.placement.worker, gpu) for action in result.actions
            if action.kind is not ActionKind.DELETE and action.placement is not None
            for gpu in action.placement.gpus]


@settings(max_examples=400, deadline=None)
@given(fleets(), st.randoms(use_true_random=False))
def test_plan_properties(fleet: tuple[DesiredState, Observed], rng: random.Random) -> None:
    desired, observed = fleet
    result = plan(desired, observed)

    _assert_order_independent(desired, observed, rng)

    claims = Counter((worker, gpu) for _, worker, gpu in _placed(result))
    assert all(count == 1 for count in claims.values()), claims

    for action in result.actions:
        if action.kind in (ActionKind.CREATE, ActionKind.RECREATE):
            _check_placement(desired, observed, action.deployment, action.placement)
        if action.kind is not ActionKind.NOOP and action.kind is not ActionKind.DELETE:
            facts = observed.workers.get(action.placement.worker)
            assert facts is not None and facts.ready, action

    for name, deployment in desired.deployments.items():
        running = [a.replica for a in result.actions if a.deployment == name and a.kind is not ActionKind.DELETE]
        missing = [u.replica for u in result.unplaceable
                   if u.deployment == name and u.replica not in running]
        # Ordinals name replicas (a surge's replacement keeps its new one): N distinct ones, not 0..N-1.
        assert len(set(running + missing)) == len(running + missing) == deployment.spec.replicas, (name, result)


def _assert_order_independent(desired: DesiredState, observed: Observed, rng: random.Random) -> None:
    result = plan(desired, observed)
    shuffled = list(observed.replicas)
    rng.shuffle(shuffled)
    workers = dict(sorted(observed.workers.items(), reverse=True))
    assert plan(desired, Observed(workers=workers, replicas=tuple(shuffled))) == result


@settings(max_examples=300, deadline=None)
@given(fleets(conflicts=True), st.randoms(use_true_random=False))
def test_plan_is_order_independent_even_with_conflicts(fleet: tuple[DesiredState, Observed],
                                                        rng: random.Random) -> None:
    """Replicas claiming one GPU, or one ordinal twice: which one wins never depends on input order."""
    _assert_order_independent(*fleet, rng)


def _check_placement(desired: DesiredState, observed: Observed, deployment: str, placement: Any) -> None:
    spec = desired.deployments[deployment].spec
    worker = desired.workers[placement.worker]
    facts = observed.workers[placement.worker]
    assert facts.ready
    assert len(placement.gpus) == spec.resources.gpus
    assert not spec.placement.workers or placement.worker in spec.placement.workers
    assert all(worker.metadata.labels.get(k) == v for k, v in spec.placement.selector.items())
    memory = {gpu.index: gpu.memory_free for gpu in facts.gpus}
    for index in placement.gpus:
        assert index in memory
        assert worker.spec.gpus == "all" or index in worker.spec.gpus
        assert memory[index] >= (spec.resources.gpu_memory or 0)


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_replicas_that_fit_stay(fleet: tuple[DesiredState, Observed]) -> None:
    """A healthy replica with the desired spec, alone on GPUs that still suit it, is a noop in place."""
    desired, observed = fleet
    result = plan(desired, observed)
    ordinals = Counter((r.deployment, r.ordinal) for r in observed.replicas)
    for replica in observed.replicas:
        deployment = desired.deployments.get(replica.deployment)
        facts = observed.workers.get(replica.worker)
        if (deployment is None or replica.status != "ready" or ordinals[(replica.deployment, replica.ordinal)] > 1
                or replica.ordinal >= deployment.spec.replicas or facts is None or not facts.ready
                or replica.worker not in desired.workers
                or replica.spec != effective_spec(replica.deployment, deployment.spec)):
            continue
        try:
            _check_placement(desired, observed, replica.deployment,
                             type("P", (), {"worker": replica.worker, "gpus": replica.gpus})())
        except AssertionError:
            continue  # it no longer fits there: moving it is allowed
        [action] = [a for a in result.actions if (a.deployment, a.replica) == (replica.deployment, replica.ordinal)]
        assert action.kind is ActionKind.NOOP and action.placement is not None, action
        assert (action.placement.worker, action.placement.gpus) == (replica.worker, replica.gpus)
