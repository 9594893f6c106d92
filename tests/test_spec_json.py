"""The effective spec's stored form and hash, pinned.

PostgreSQL holds each deployment's and replica's effective spec as JSON, and each sync run's plan (with its
field diffs and spec hashes); containers carry the spec hash as a label. If any of these changed for the same
manifest, an upgrade would recreate every running container, or show a plan change where there is none.

The literals below were computed by the code as it was before the effective spec became a typed object
(commit d97cb77, `effective_spec` returning a camelCase dict). They must never change unless a migration of the
stored specs is meant: do not update them to make a test pass.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from lmstack.backends import EffectiveSpec, effective_spec, normalize_applied, spec_hash
from lmstack.manifests import load_manifests
from lmstack.manifests.schema import DeploymentSpec
from lmstack.reconcile.model import GpuFacts, Observed, ReplicaObservation, WorkerObservation
from lmstack.reconcile.planner import plan

MANIFESTS: dict[str, dict[str, Any]] = {
    "qwen-7b": {"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct"},
    "chat": {"backend": "vllm", "model": "meta-llama/Llama-3.1-70B-Instruct", "servedName": "llama-70b",
             "image": "vllm/vllm-openai:v0.10.2", "replicas": 2,
             "resources": {"gpus": 4, "gpuMemory": "70Gi"},
             "placement": {"workers": ["gpu-a", "gpu-b"], "selector": {"rack": "r1"}, "strategy": "spread"},
             "args": ["--max-model-len", "8192", "--enable-prefix-caching"],
             "env": {"HF_TOKEN": {"fromEnv": "LMSTACK_SECRET_HF_TOKEN"}, "KEY": {"fromFile": "keys/k.txt"},
                     "VLLM_LOGGING_LEVEL": "DEBUG"},
             "health": {"startupTimeout": "1h30m"}, "rollout": {"maxUnavailable": 1}},
    "sg": {"backend": "sglang", "model": "Qwen/Qwen2.5-7B-Instruct", "resources": {"gpus": 2, "gpuMemory": "512Mi"},
           "health": {"startupTimeout": 90}},
    "phi": {"backend": "ollama", "model": "phi3:mini", "resources": {"gpus": 0}, "replicas": 3},
    "tiny": {"backend": "llamacpp", "model": "hf://ggml-org/tinygemma3-GGUF/tinygemma3-Q8_0.gguf",
             "resources": {"gpus": 0}, "args": ["-c", "2048"]},
    "tiny-gpu": {"backend": "llamacpp", "model": "models/tiny.gguf",
                 "resources": {"gpus": 1, "gpuMemory": 1000000000}},
}

# name -> (the stored JSON, key order included, and the spec hash). Never change these without a migration.
PINNED: dict[str, tuple[str, str]] = {
    "qwen-7b": (
        '{"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct", "servedName": "qwen-7b", '
        '"image": "vllm/vllm-openai:v0.11.0", "replicas": 1, "resources": {"gpus": 1, "gpuMemory": null}, '
        '"placement": {"workers": [], "selector": {}, "strategy": "binpack"}, "args": [], "env": {}, '
        '"health": {"startupTimeout": "20m"}, "rollout": {"maxUnavailable": 0, "drainTimeout": "30s"}}',
        "60605e32314b5e49"),
    "chat": (
        '{"backend": "vllm", "model": "meta-llama/Llama-3.1-70B-Instruct", "servedName": "llama-70b", '
        '"image": "vllm/vllm-openai:v0.10.2", "replicas": 2, "resources": {"gpus": 4, '
        '"gpuMemory": "70Gi"}, "placement": {"workers": ["gpu-a", "gpu-b"], "selector": {"rack": "r1"}, '
        '"strategy": "spread"}, "args": ["--max-model-len", "8192", "--enable-prefix-caching"], '
        '"env": {"HF_TOKEN": {"fromEnv": "LMSTACK_SECRET_HF_TOKEN"}, "KEY": {"fromFile": "keys/k.txt"}, '
        '"VLLM_LOGGING_LEVEL": "DEBUG"}, "health": {"startupTimeout": "1h30m"}, '
        '"rollout": {"maxUnavailable": 1, "drainTimeout": "30s"}}',
        "0023ee5f1ebedab5"),
    "sg": (
        '{"backend": "sglang", "model": "Qwen/Qwen2.5-7B-Instruct", "servedName": "sg", '
        '"image": "lmsysorg/sglang:v0.5.3-cu126", "replicas": 1, "resources": {"gpus": 2, '
        '"gpuMemory": "512Mi"}, "placement": {"workers": [], "selector": {}, "strategy": "binpack"}, '
        '"args": [], "env": {}, "health": {"startupTimeout": "1m30s"}, '
        '"rollout": {"maxUnavailable": 0, "drainTimeout": "30s"}}',
        "8ee3f57b3b51736d"),
    "phi": (
        '{"backend": "ollama", "model": "phi3:mini", "servedName": "phi", "image": "ollama/ollama:0.12.6", '
        '"replicas": 3, "resources": {"gpus": 0, "gpuMemory": null}, "placement": {"workers": [], '
        '"selector": {}, "strategy": "binpack"}, "args": [], "env": {}, '
        '"health": {"startupTimeout": "20m"}, "rollout": {"maxUnavailable": 0, "drainTimeout": "30s"}}',
        "f8dd13bc238da902"),
    "tiny": (
        '{"backend": "llamacpp", "model": "hf://ggml-org/tinygemma3-GGUF/tinygemma3-Q8_0.gguf", '
        '"servedName": "tiny", "image": "ghcr.io/ggml-org/llama.cpp:server-b10133", "replicas": 1, '
        '"resources": {"gpus": 0, "gpuMemory": null}, "placement": {"workers": [], "selector": {}, '
        '"strategy": "binpack"}, "args": ["-c", "2048"], "env": {}, "health": {"startupTimeout": "20m"}, '
        '"rollout": {"maxUnavailable": 0, "drainTimeout": "30s"}}',
        "32c5cb4a6e6a927c"),
    "tiny-gpu": (
        '{"backend": "llamacpp", "model": "models/tiny.gguf", "servedName": "tiny-gpu", '
        '"image": "ghcr.io/ggml-org/llama.cpp:server-cuda-b10133", "replicas": 1, "resources": {"gpus": 1, '
        '"gpuMemory": "1G"}, "placement": {"workers": [], "selector": {}, "strategy": "binpack"}, '
        '"args": [], "env": {}, "health": {"startupTimeout": "20m"}, '
        '"rollout": {"maxUnavailable": 0, "drainTimeout": "30s"}}',
        "cd97ab869ef96068"),
}


def _effective(name: str) -> EffectiveSpec:
    return effective_spec(name, DeploymentSpec.model_validate(MANIFESTS[name]))


@pytest.mark.parametrize("name", list(PINNED))
def test_stored_json_and_hash_are_what_earlier_versions_stored(name: str) -> None:
    stored, hashed = PINNED[name]
    spec = _effective(name)
    assert json.dumps(spec.to_json()) == stored
    assert spec_hash(spec) == hashed
    # Read back, it is the same spec: a replica stored with it plans no change.
    assert normalize_applied(name, json.loads(stored)) == spec


def test_a_spec_stored_by_an_older_version_gets_todays_defaults() -> None:
    """Stored before servedName, image, placement and rollout were filled in: read with today's defaults."""
    old = {"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct", "replicas": 1,
           "resources": {"gpus": 1, "gpuMemory": None}, "args": [], "env": {}, "health": {"startupTimeout": "20m"}}
    spec = normalize_applied("old", old)
    assert spec is not None
    assert json.dumps(spec.to_json()) == (
        '{"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct", "servedName": "old", '
        '"image": "vllm/vllm-openai:v0.11.0", "replicas": 1, "resources": {"gpus": 1, "gpuMemory": null}, '
        '"placement": {"workers": [], "selector": {}, "strategy": "binpack"}, "args": [], "env": {}, '
        '"health": {"startupTimeout": "20m"}, "rollout": {"maxUnavailable": 0, "drainTimeout": "30s"}}')
    assert spec_hash(spec) == "41fbcfed7942ba58"
    assert normalize_applied("bad", {"backend": "tgi", "model": "x"}) is None


def test_typed_attributes_hold_the_defaults() -> None:
    spec = _effective("qwen-7b")
    assert (spec.backend, spec.served_name, spec.image, spec.replicas) == (
        "vllm", "qwen-7b", "vllm/vllm-openai:v0.11.0", 1)
    assert (spec.resources.gpus, spec.resources.gpu_memory, spec.health.startup_timeout) == (1, None, 1200)
    assert (spec.args, dict(spec.env), spec.placement.strategy, spec.rollout.max_unavailable) == ((), {}, "binpack", 0)
    chat = _effective("chat")
    assert chat.resources.gpu_memory == 70 * 2**30 and chat.health.startup_timeout == 5400
    with pytest.raises(ValueError, match="frozen"):
        chat.image = "other"  # type: ignore[misc]


def test_the_effective_spec_has_the_manifests_fields_in_order() -> None:
    """Its JSON keys come in the manifest's order; a field added to the manifest must be added here too."""
    assert list(EffectiveSpec.model_fields) == list(DeploymentSpec.model_fields)


def test_a_sync_runs_plan_is_stored_as_before() -> None:
    """The plan stored with each sync run: field diffs in the stored form, and the spec hashes."""
    docs = [
        {"kind": "Worker", "metadata": {"name": "gpu-a"}, "spec": {"host": "gpu-a"}},
        {"kind": "Deployment", "metadata": {"name": "chat"},
         "spec": {"backend": "vllm", "model": "Qwen/Qwen2.5-7B-Instruct", "replicas": 2,
                  "resources": {"gpus": 1, "gpuMemory": "24Gi"}, "args": ["--new"], "env": {"A": "1"},
                  "rollout": {"maxUnavailable": 1}}},
        {"kind": "Deployment", "metadata": {"name": "phi"},
         "spec": {"backend": "ollama", "model": "phi3:mini", "resources": {"gpus": 0}}},
    ]
    desired = load_manifests({"m.yaml": yaml.safe_dump_all([{"apiVersion": "lmstack.dev/v1", **doc} for doc in docs])},
                             inventory_hosts=None)
    chat = effective_spec("chat", desired.deployments["chat"].spec).to_json()
    old_chat = {**chat, "args": ["--old"], "env": {"A": "0", "B": {"fromEnv": "X"}},
                "resources": {"gpus": 1, "gpuMemory": "16Gi"}}
    old_phi = {**effective_spec("phi", desired.deployments["phi"].spec).to_json(), "model": "llama3.2:1b",
               "servedName": "llama"}
    observed = Observed(
        workers={"gpu-a": WorkerObservation("gpu-a", facts_known=True, ready=True,
                                            gpus=tuple(GpuFacts(i, 80 * 2**30) for i in range(2)))},
        replicas=(ReplicaObservation("chat", 0, "gpu-a", (0,), old_chat),
                  ReplicaObservation("phi", 0, "gpu-a", (), old_phi),
                  ReplicaObservation("gone", 0, "gpu-a", (1,), {"backend": "vllm", "model": "m"})))
    assert json.dumps(plan(desired, observed).to_json()) == (
        '{"actions": [{"kind": "recreate", "deployment": "chat", "replica": 0, '
        '"reason": "spec changed: args, env.A, env.B, resources.gpuMemory; drained and stopped first: no room to '
        'start its replacement beside it (needs 1 GPU with 24Gi free; gpu-a has 0 free)", '
        '"placement": {"worker": "gpu-a", "gpus": [0]}, "previous": {"worker": "gpu-a", "gpus": [0]}, '
        '"changes": [{"path": "args", "old": ["--old"], "new": ["--new"]}, {"path": "env.A", "old": "0", '
        '"new": "1"}, {"path": "env.B", "old": {"fromEnv": "X"}, "new": null}, '
        '{"path": "resources.gpuMemory", "old": "16Gi", "new": "24Gi"}], "specHash": "64d66bc72eaf57ed", '
        '"adopt": false, "surge": null}, '
        '{"kind": "create", "deployment": "chat", "replica": 1, "reason": "scale up 1 -> 2", '
        '"placement": {"worker": "gpu-a", "gpus": [1]}, "previous": null, "changes": [], '
        '"specHash": "64d66bc72eaf57ed", "adopt": false, "surge": null}, '
        '{"kind": "delete", "deployment": "gone", "replica": 0, '
        '"reason": "deployment removed from manifests", "placement": null, "previous": {"worker": "gpu-a", '
        '"gpus": [1]}, "changes": [], "specHash": null, "adopt": false, "surge": null}, '
        '{"kind": "update", "deployment": "phi", '
        '"replica": 0, "reason": "changed in place: model, servedName", "placement": {"worker": "gpu-a", '
        '"gpus": []}, "previous": {"worker": "gpu-a", "gpus": []}, "changes": [{"path": "model", '
        '"old": "llama3.2:1b", "new": "phi3:mini"}, {"path": "servedName", "old": "llama", "new": "phi"}], '
        '"specHash": "f8dd13bc238da902", "adopt": false, "surge": null}], "unplaceable": [], '
        '"notes": ["chat: down during this change: chat/0 stopped before the replacement is ready (no room to start '
        'one beside it; rollout.maxUnavailable: 1)"], "downtime": [{"deployment": "chat", "reason": "chat/0 stopped '
        'before the replacement is ready (no room to start one beside it; rollout.maxUnavailable: 1)"}], '
        '"summary": {"create": 1, '
        '"recreate": 1, "update": 1, "delete": 1, "noop": 0, "unplaceable": 0}}')
