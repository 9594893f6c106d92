"""Backends, one module each, and the effective spec (defaults filled) that plans compare."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from lmstack.backends import llamacpp, ollama, sglang, vllm
from lmstack.backends.base import Backend, EffectiveSpec, HttpCall, ModelDownload, ReplicaContext, SpecView
from lmstack.backends.container import ContainerSpec
from lmstack.manifests.schema import BACKEND_NAMES, DeploymentSpec

BACKENDS: dict[str, Backend] = {module.BACKEND.name: module.BACKEND for module in (vllm, sglang, ollama, llamacpp)}
assert set(BACKENDS) == set(BACKEND_NAMES), "the schema's backend names and the backend modules differ"


def backend_for(name: str) -> Backend:
    return BACKENDS[name]


def effective_spec(name: str, spec: DeploymentSpec) -> EffectiveSpec:
    """The spec with every default filled in (image, servedName), in manifest (camelCase) form.

    Plans compare effective specs on both sides, so a default never looks like a change.
    """
    data = spec.model_dump(by_alias=True, mode="json")
    data["image"] = spec.image or BACKENDS[spec.backend].image_for(spec.resources.gpus)
    data["servedName"] = spec.served_name or name
    return data


def normalize_applied(name: str, applied: dict[str, Any]) -> EffectiveSpec | None:
    """An effective spec stored earlier, re-read with today's defaults; None if it no longer validates."""
    try:
        return effective_spec(name, DeploymentSpec.model_validate(applied))
    except ValueError:
        return None


def spec_hash(spec: EffectiveSpec) -> str:
    """Hash of the fields that need a restart: equal hashes mean the container can stay."""
    backend = BACKENDS[spec["backend"]]
    restart = {path: _get(spec, path) for path in backend.restart_fields}
    text = json.dumps(restart, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _get(spec: EffectiveSpec, path: str) -> Any:
    value: Any = spec
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


__all__ = ["BACKENDS", "Backend", "ContainerSpec", "EffectiveSpec", "HttpCall", "ModelDownload", "ReplicaContext",
           "SpecView", "backend_for", "effective_spec", "normalize_applied", "spec_hash"]
