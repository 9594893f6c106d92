"""How long plan() takes on big synthetic fleets. Prints figures; checks only that steady states are noops.

    .venv/bin/python bench/plan_scale.py            # 10k deployments on 1k workers, then the growth table
    .venv/bin/python bench/plan_scale.py --profile  # the same, plus a cProfile of the from-scratch plan

Inputs are built in memory with the pydantic models (no YAML), seeded, and are not timed: each figure is
the best of 3 runs of plan() alone, measured with time.perf_counter.

The fleet: workers with 8 GPUs of 80Gi each (a quarter labelled gpu=h100, the rest a100, four zones; one
GPU in twenty has 30Gi held by something lmstack does not manage). The deployments: 1/2/4/8 GPUs per
replica (50/25/15/10 %), 1-3 replicas, vllm/sglang/ollama, a fifth with gpuMemory, 30 % spread, 10 %
selecting gpu=h100, 10 % selecting a zone, 2 % pinned to three named workers.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from lmstack.backends import effective_spec
from lmstack.manifests.loader import DesiredState
from lmstack.manifests.schema import Deployment, Worker
from lmstack.reconcile.model import (
    ActionKind,
    GpuFacts,
    Observed,
    Plan,
    ReplicaObservation,
    WorkerObservation,
)
from lmstack.reconcile.planner import plan

GiB = 2**30
GPUS_PER_WORKER = 8
ZONES = 4
# GPUs per replica and their share of deployments.
GPU_MIX = ((1, 0.50), (2, 0.25), (4, 0.15), (8, 0.10))
MEAN_GPUS = sum(gpus * share for gpus, share in GPU_MIX)  # 2.4
MEAN_REPLICAS = 2.0  # replicas are 1, 2 or 3, evenly


def worker_name(index: int) -> str:
    return f"w{index:06d}"


def unmanaged(rng: random.Random) -> int:
    return 30 * GiB if rng.random() < 0.05 else 0  # one GPU in twenty runs something lmstack did not start


def build_workers(count: int, rng: random.Random) -> tuple[dict[str, Worker], dict[str, WorkerObservation]]:
    workers: dict[str, Worker] = {}
    observed: dict[str, WorkerObservation] = {}
    for index in range(count):
        name = worker_name(index)
        labels = {"gpu": "h100" if index % 4 == 0 else "a100", "zone": f"z{index % ZONES}"}
        workers[name] = Worker.model_validate({
            "apiVersion": "lmstack.dev/v1", "kind": "Worker",
            "metadata": {"name": name, "labels": labels}, "spec": {"host": name},
        })
        gpus = tuple(
            GpuFacts(index=gpu, memory_total=80 * GiB, memory_unmanaged=unmanaged(rng))
            for gpu in range(GPUS_PER_WORKER)
        )
        observed[name] = WorkerObservation(name, facts_known=True, ready=True, gpus=gpus)
    return workers, observed


def build_deployment(index: int, workers: int, rng: random.Random) -> Deployment:
    gpus = rng.choices([g for g, _ in GPU_MIX], weights=[w for _, w in GPU_MIX])[0]
    backend = rng.choice(("vllm", "vllm", "sglang", "ollama"))
    placement: dict[str, Any] = {"strategy": "spread" if rng.random() < 0.3 else "binpack"}
    roll = rng.random()
    if roll < 0.10:
        placement["selector"] = {"gpu": "h100"}
    elif roll < 0.20:
        placement["selector"] = {"zone": f"z{rng.randrange(ZONES)}"}
    elif roll < 0.22:
        placement["workers"] = [worker_name(rng.randrange(workers)) for _ in range(3)]
    resources: dict[str, Any] = {"gpus": gpus}
    if rng.random() < 0.2:
        resources["gpuMemory"] = rng.choice(("40Gi", "60Gi", "70Gi"))
    return Deployment.model_validate({
        "apiVersion": "lmstack.dev/v1", "kind": "Deployment",
        "metadata": {"name": f"d{index:06d}"},
        "spec": {
            "backend": backend, "model": f"org/model-{index % 97}", "replicas": rng.randint(1, 3),
            "resources": resources, "placement": placement, "args": ["--max-model-len", "8192"],
            "env": {"HF_HOME": "/models"},
        },
    })


def build_desired(workers: int, deployments: int, seed: int) -> tuple[DesiredState, Observed]:
    rng = random.Random(seed)
    worker_specs, facts = build_workers(workers, rng)
    specs = {d.metadata.name: d for d in (build_deployment(i, workers, rng) for i in range(deployments))}
    return DesiredState(workers=worker_specs, deployments=specs, origins={}), Observed(workers=facts)


def steady_state(desired: DesiredState, observed: Observed, scratch: Plan) -> tuple[DesiredState, Observed]:
    """What the fleet looks like once `scratch` is applied: every placed replica runs, each deployment
    wants exactly the replicas that were placed. Specs are copies, as if read back from the database."""
    placed: dict[str, int] = {}
    replicas = []
    for action in scratch.actions:
        if action.kind is not ActionKind.CREATE or action.placement is None:
            continue
        deployment = desired.deployments[action.deployment]
        stored = json.loads(json.dumps(effective_spec(action.deployment, deployment.spec).to_json()))
        replicas.append(ReplicaObservation(action.deployment, action.replica, action.placement.worker,
                                           action.placement.gpus, stored, "ready"))
        placed[action.deployment] = placed.get(action.deployment, 0) + 1
    deployments = {
        name: deployment.model_copy(update={
            "spec": deployment.spec.model_copy(update={"replicas": placed.get(name, 0)})})
        for name, deployment in desired.deployments.items()
    }
    return (DesiredState(desired.workers, deployments, desired.origins),
            Observed(workers=observed.workers, replicas=tuple(replicas)))


def fleet_for(replicas: int) -> int:
    """Workers enough for `replicas` of the mix, with ~25 % headroom for fragmentation and selectors."""
    return int(replicas * MEAN_GPUS / GPUS_PER_WORKER * 1.25) + 1


class GcPauses:
    """Seconds spent in Python's cyclic garbage collector, which scans the whole heap (the inputs too)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


def best_of(runs: int, call: Callable[[], Plan]) -> tuple[float, float, Plan]:
    """The best wall time of `runs` calls, the GC pauses within that run, and the plan."""
    best = (float("inf"), 0.0)
    result = None
    for _ in range(runs):
        pauses = GcPauses()
        gc.callbacks.append(pauses)
        try:
            start = time.perf_counter()
            result = call()
            best = min(best, (time.perf_counter() - start, pauses.seconds))
        finally:
            gc.callbacks.remove(pauses)
    assert result is not None
    return best[0], best[1], result


def summary(result: Plan) -> str:
    counts = result.counts()
    shown = ", ".join(f"{counts[kind]} {kind.value}" for kind in ActionKind if counts[kind])
    return f"{shown}, {len(result.unplaceable)} unplaceable"


def headline(profile: bool) -> None:
    desired, observed = build_desired(workers=1000, deployments=10_000, seed=1)
    scratch_s, scratch_gc, scratch = best_of(3, partial(plan, desired, observed))
    print("10,000 deployments on 1,000 workers (8,000 GPUs), best of 3 (of which GC pauses):")
    print(f"  (a) from scratch: {scratch_s:6.3f} s ({scratch_gc:.3f})  {summary(scratch)}")
    steady_desired, steady_observed = steady_state(desired, observed, scratch)
    steady_s, steady_gc, steady = best_of(3, partial(plan, steady_desired, steady_observed))
    print(f"  (b) steady state: {steady_s:6.3f} s ({steady_gc:.3f})  {summary(steady)}  (what (a) placed, running)")
    assert not steady.has_changes, "the steady state should plan no change"
    # Biggest first, the 8-GPU replicas alone fill those 1,000 workers. The same 10,000 deployments with
    # every replica running need a fleet sized for them:
    workers = fleet_for(sum(d.spec.replicas for d in desired.deployments.values()))
    big_desired, big_observed = build_desired(workers=workers, deployments=10_000, seed=1)
    big_desired, big_observed = steady_state(big_desired, big_observed, plan(big_desired, big_observed))
    big_s, big_gc, big = best_of(3, partial(plan, big_desired, big_observed))
    assert not big.has_changes, "the steady state should plan no change"
    print(f"  (c) steady state: {big_s:6.3f} s ({big_gc:.3f})  {summary(big)}  "
          f"(every replica running, {workers:,} workers)")
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(plan, desired, observed)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


def growth() -> None:
    print()
    print("Growth (fleet sized for the replicas with ~25 % headroom; best of 3):")
    print(f"  {'replicas':>9} {'workers':>8} {'deployments':>12} {'plan':>8} {'seconds':>8} {'(GC)':>7}"
          f" {'actions/s':>10} {'unplaceable':>12}")
    for replicas in (1_000, 10_000, 100_000):
        deployments = int(replicas / MEAN_REPLICAS)
        workers = fleet_for(replicas)
        desired, observed = build_desired(workers=workers, deployments=deployments, seed=2)
        scratch_s, scratch_gc, scratch = best_of(3, partial(plan, desired, observed))
        steady_desired, steady_observed = steady_state(desired, observed, scratch)
        steady_s, steady_gc, steady = best_of(3, partial(plan, steady_desired, steady_observed))
        assert not steady.has_changes, "the steady state should plan no change"
        for label, seconds, pauses, result in (("scratch", scratch_s, scratch_gc, scratch),
                                               ("steady", steady_s, steady_gc, steady)):
            planned = len(result.actions) + len(result.unplaceable)  # every replica: an action or unplaceable
            rate = len(result.actions) / seconds if seconds else float("inf")
            print(f"  {planned:>9,} {workers:>8,} {deployments:>12,} {label:>8} {seconds:>8.3f} ({pauses:5.3f})"
                  f" {rate:>10,.0f} {len(result.unplaceable):>12,}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the 10k-deployment from-scratch plan")
    parser.add_argument("--no-growth", action="store_true", help="skip the growth table")
    args = parser.parse_args()
    headline(args.profile)
    if not args.no_growth:
        growth()


if __name__ == "__main__":
    main()
