"""The effective spec: what one deployment runs, every default filled in, typed and frozen.

`effective_spec()` (lmstack.backends) builds it from a manifest once; the planner, the executor, the backends,
the records and the gateway read its attributes. Its JSON form (`to_json`) is the manifest's camelCase shape
with `image` and `servedName` filled in: PostgreSQL stores it for each deployment and replica, plans compare
and diff it, spec hashes are taken over it. That shape must never change without a migration (an upgrade
would recreate every container): tests/test_spec_json.py pins it. `normalize_applied()` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

from lmstack.manifests.schema import BackendName, EnvValue, Health, Placement, Resources, Rollout


class EffectiveSpec(BaseModel):
    """A deployment's spec as it runs. The fields, in order, are the manifest's DeploymentSpec's; none has a
    default here: the manifest schema holds the defaults, and `effective_spec()` fills the two it leaves open."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)

    backend: BackendName
    model: str
    served_name: str  # the `model` clients send: the manifest's servedName, else the deployment's name
    image: str  # the manifest's image, else the backend's pinned one for the replica's GPU count
    replicas: int
    resources: Resources  # gpus per replica; gpu_memory: bytes free needed on each of them, or None
    placement: Placement
    args: tuple[str, ...]  # extra engine arguments, after lmstack's own
    env: Mapping[str, EnvValue]  # values, or references resolved on the lmstack server (never stored resolved)
    health: Health  # startup_timeout in seconds
    rollout: Rollout

    def to_json(self) -> dict[str, Any]:
        """The stored and compared form (a new dict each time: callers may keep or change it)."""
        return self.model_dump(by_alias=True, mode="json")
