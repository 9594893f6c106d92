"""Plan cases as data: tests/plans/*.yaml hold desired manifests, observed facts and replicas, and the
actions a user should see. One file per case; the file says what it shows.

Every expected result is worked out by hand from the rules (scheduler.py's docstring), never copied
from the planner's output.

Format:
  description: what the case shows
  desired: [manifest documents]            # apiVersion may be left out
  observed:
    workers:                               # a worker left out here has no facts ("facts unknown")
      gpu-a: {gpus: 4, memory: 80Gi}       # N identical GPUs, nothing else on them
      gpu-b: {gpus: [{memory: 80Gi, unmanaged: 70Gi}, {memory: 80Gi}]}
      gpu-c: {ready: false, reason: unreachable}
    replicas:
      - {replica: qwen/0, worker: gpu-a, gpus: [0], status: ready,
         spec: {args: [--old]}}            # spec: changes merged onto the desired spec it was made from
  applied:                                 # optional: the manifest replicas of a deployment were made
    old-model: {kind: Deployment, ...}     # from, when not the desired one (a deployment removed from
                                           # the manifests, or written differently before)
  expected:
    actions:                               # every action, noop included
      - {kind: create, replica: qwen/0, worker: gpu-a, gpus: [0], from: gpu-b, reason: substring,
         changes: [args]}                  # from, reason and changes are checked only when given
    unplaceable:
      - {replica: qwen/2, reason: substring}
    notes: [substring]
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmstack.backends import effective_spec
from lmstack.manifests import load_manifests
from lmstack.manifests.quantity import parse_quantity
from lmstack.reconcile.model import GpuFacts, Observed, ReplicaObservation, WorkerObservation
from lmstack.reconcile.planner import plan

CASES = sorted((Path(__file__).parent / "plans").glob("*.yaml"))


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _worker(name: str, data: dict[str, Any]) -> WorkerObservation:
    if data.get("ready", True) is False:
        reason = data.get("reason", "unreachable")
        return WorkerObservation(name, facts_known=True, ready=False, reason=reason)
    gpus = data.get("gpus", 0)
    if isinstance(gpus, int):
        gpus = [{"memory": data.get("memory", "80Gi")}] * gpus
    facts = tuple(
        GpuFacts(index=gpu.get("index", index), memory_total=parse_quantity(gpu["memory"]),
                 memory_unmanaged=parse_quantity(gpu.get("unmanaged", 0)))
        for index, gpu in enumerate(gpus)
    )
    return WorkerObservation(name, facts_known=True, ready=True, gpus=facts)


def load_case(path: Path) -> tuple[Any, Observed, dict[str, Any]]:
    case = yaml.safe_load(path.read_text())
    documents = [{"apiVersion": "lmstack.dev/v1", **doc} for doc in case.get("desired", [])]
    desired = load_manifests({path.name: yaml.safe_dump_all(documents)}, inventory_hosts=None)
    observed_data = case.get("observed", {}) or {}
    workers = {name: _worker(name, data or {}) for name, data in (observed_data.get("workers") or {}).items()}
    replicas = []
    for item in observed_data.get("replicas") or []:
        deployment, ordinal = item["replica"].split("/")
        # A replica of a deployment that is gone from the manifests: the spec it was made from is given.
        made_from = case.get("applied", {}).get(deployment)
        if made_from is not None:
            base = effective_spec(deployment, load_manifests(
                {"applied.yaml": yaml.safe_dump({"apiVersion": "lmstack.dev/v1", **made_from})},
                inventory_hosts=None).deployments[deployment].spec).to_json()
        else:
            base = effective_spec(deployment, desired.deployments[deployment].spec).to_json()
        replicas.append(ReplicaObservation(
            deployment=deployment, ordinal=int(ordinal), worker=item["worker"],
            gpus=tuple(item.get("gpus", [])),
            spec=_merge(base, item.get("spec", {})), status=item.get("status", "ready"),
        ))
    return desired, Observed(workers=workers, replicas=tuple(replicas)), case["expected"]


def _shown(action: Any, expected: dict[str, Any]) -> dict[str, Any]:
    shown: dict[str, Any] = {"kind": action.kind.value, "replica": action.replica_name}
    if action.placement is not None and action.kind.value != "delete":
        shown["worker"] = action.placement.worker
        shown["gpus"] = list(action.placement.gpus)
    if action.surge is not None:  # always shown: a case never hides whether a replica is replaced by surge
        shown["surge"] = f"{action.deployment}/{action.surge}"
    if "from" in expected:
        shown["from"] = action.previous.worker if action.previous else None
    if "reason" in expected:
        shown["reason"] = expected["reason"] if expected["reason"] in action.reason else action.reason
    if "changes" in expected:
        shown["changes"] = [change.path for change in action.changes]
    return shown


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("path", CASES, ids=[path.stem for path in CASES])
def test_plan_case(path: Path) -> None:
    desired, observed, expected = load_case(path)
    prune = bool(yaml.safe_load(path.read_text()).get("prune", True))
    result = plan(desired, observed, prune=prune)
    wanted = expected.get("actions", [])
    by_replica = {}
    for action in result.actions:
        by_replica.setdefault(action.replica_name, []).append(action)
    actual = []
    for item in wanted:
        candidates = by_replica.get(item["replica"], [])
        first = candidates[0] if candidates else None
        match = next((a for a in candidates if a.kind.value == item["kind"]), first)
        if match is not None:
            candidates.remove(match)
            actual.append(_shown(match, item))
    actual.extend(_shown(a, {}) for rest in by_replica.values() for a in rest)
    assert actual == [{k: v for k, v in item.items()} for item in wanted]

    unplaceable = [{"replica": f"{u.deployment}/{u.replica}", "reason": u.reason} for u in result.unplaceable]
    wanted_unplaceable = expected.get("unplaceable", [])
    assert len(unplaceable) == len(wanted_unplaceable), unplaceable
    for got, want in zip(unplaceable, wanted_unplaceable, strict=True):
        assert got["replica"] == want["replica"]
        assert want["reason"] in got["reason"], got["reason"]
    for note in expected.get("notes", []):
        assert any(note in line for line in result.notes), result.notes
    # A plan is a pure function of its inputs: the same inputs give the same plan.
    assert plan(desired, observed, prune=prune) == result
