"""Backends, one module each, and the effective spec (every default filled in) that everything above reads.

The one place a spec's defaults are filled (`effective_spec`) and its stored JSON form is read back
(`normalize_applied`); `EffectiveSpec.to_json` writes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from lmstack.backends import llamacpp, ollama, sglang, vllm
from lmstack.backends.base import Backend, HttpCall, ModelDownload, ReplicaContext
from lmstack.backends.container import ContainerSpec
from lmstack.backends.spec import EffectiveSpec
from lmstack.manifests.schema import BACKEND_NAMES, DeploymentSpec

BACKENDS: dict[str, Backend] = {module.BACKEND.name: module.BACKEND for module in (vllm, sglang, ollama, llamacpp)}
assert set(BACKENDS) == set(BACKEND_NAMES), "the schema's backend names and the backend modules differ"


def backend_for(name: str) -> Backend:
    return BACKENDS[name]


def effective_spec(name: str, spec: DeploymentSpec) -> EffectiveSpec:
    """The spec of deployment `name` with every default filled in: the schema's, the backend's pinned image
    and the served name (the deployment's name).

    Plans compare effective specs on both sides, so a default never looks like a change.
    """
    return EffectiveSpec(
        backend=spec.backend, model=spec.model, served_name=spec.served_name or name,
        image=spec.image or BACKENDS[spec.backend].image_for(spec.resources.gpus), replicas=spec.replicas,
        resources=spec.resources, placement=spec.placement, args=tuple(spec.args), env=spec.env,
        health=spec.health, rollout=spec.rollout,
    )


def normalize_applied(name: str, applied: Mapping[str, Any]) -> EffectiveSpec | None:
    """An effective spec stored earlier (its JSON form, by this version or an older one), re-read with today's
    defaults; None if it no longer validates."""
    try:
        return effective_spec(name, DeploymentSpec.model_validate(dict(applied)))
    except ValueError:
        return None


def spec_hash(spec: EffectiveSpec) -> str:
    """Hash of the fields that need a restart (of the JSON form): equal hashes mean the container can stay."""
    data = spec.to_json()
    restart = {path: _get(data, path) for path in BACKENDS[spec.backend].restart_fields}
    text = json.dumps(restart, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _get(data: Mapping[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


__all__ = ["BACKENDS", "Backend", "ContainerSpec", "EffectiveSpec", "HttpCall", "ModelDownload", "ReplicaContext",
           "backend_for", "effective_spec", "normalize_applied", "spec_hash"]
