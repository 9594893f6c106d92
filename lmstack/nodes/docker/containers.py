"""What lmstack reads from and writes to Docker about one container: `ManagedContainer` from Docker's
inspect answer, and the create options (binds, restart policy) from a `ContainerSpec`. A container is
lmstack's when it carries the `lmstack.deployment` label; no other container is ever touched."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

import docker.errors  # type: ignore[import-untyped]

from lmstack.backends.container import LABEL_DEPLOYMENT, LABEL_PORT
from lmstack.nodes.docker.errors import NodeError, clip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManagedContainer:
    id: str
    name: str
    image: str  # as asked for (the image reference, not its digest)
    state: str  # created, running, restarting, paused, exited, removing, dead
    status: str  # Docker's text, e.g. "Up 3 minutes", "Exited (1) 2 seconds ago"
    exit_code: int | None  # None while it has never stopped
    started_at: datetime | None  # None if never started
    finished_at: datetime | None
    restart_count: int
    oom_killed: bool
    error: str  # Docker's error for the last start, if any
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    port: int | None = None  # from the lmstack.port label

    @property
    def deployment(self) -> str:
        return self.labels.get(LABEL_DEPLOYMENT, "")

    @property
    def running(self) -> bool:
        return self.state == "running"



def inspect_or_none(api: Any, container_id: str) -> dict[str, Any] | None:
    try:
        attrs: dict[str, Any] = api.inspect_container(container_id)
    except docker.errors.NotFound:
        return None
    return attrs


def is_managed(attrs: Mapping[str, Any]) -> bool:
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    return bool(labels.get(LABEL_DEPLOYMENT))


def container_name(attrs: Mapping[str, Any]) -> str:
    return str(attrs.get("Name", "")).lstrip("/")


def status_text(api: Any, container_id: str) -> str:
    summaries = api.containers(all=True, filters={"id": container_id})
    return str(summaries[0].get("Status", "")) if summaries else ""


def managed_container(attrs: Mapping[str, Any], status: str) -> ManagedContainer:
    state = attrs.get("State") or {}
    labels = dict((attrs.get("Config") or {}).get("Labels") or {})
    started = _timestamp(state.get("StartedAt"))
    finished = _timestamp(state.get("FinishedAt"))
    return ManagedContainer(
        id=str(attrs["Id"]),
        name=container_name(attrs),
        image=str((attrs.get("Config") or {}).get("Image", "")),
        state=str(state.get("Status", "")),
        status=status,
        exit_code=int(state.get("ExitCode", 0)) if finished is not None else None,
        started_at=started,
        finished_at=finished,
        restart_count=int(attrs.get("RestartCount", 0)),
        oom_killed=bool(state.get("OOMKilled", False)),
        error=str(state.get("Error", "")),
        labels=MappingProxyType(labels),
        port=label_port(labels.get(LABEL_PORT)),
    )


def _timestamp(value: object) -> datetime | None:
    """Docker's RFC 3339 times (nanoseconds, Z); its zero time (never happened) is None."""
    if not isinstance(value, str) or not value or value.startswith("0001-01-01"):
        return None
    head, dot, rest = value.partition(".")
    if dot:  # fromisoformat takes at most microseconds
        digits = "".join(c for c in rest if c.isdigit())
        value = f"{head}.{digits[:6]}{rest[len(digits):]}"
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def label_port(value: object) -> int | None:
    try:
        port = int(str(value))
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def binds(volumes: Mapping[str, str]) -> dict[str, dict[str, str]]:
    binds = {}
    for host_path, target in volumes.items():
        path, _, mode = target.partition(":")
        binds[host_path] = {"bind": path, "mode": mode or "rw"}
    return binds


def restart_policy(policy: str) -> dict[str, Any]:
    name, _, retries = policy.partition(":")
    if name == "on-failure" and retries:
        return {"Name": name, "MaximumRetryCount": int(retries)}
    return {"Name": "" if name == "no" else name}


def discard(api: Any, worker: str, container_id: str, name: str) -> None:
    """Remove a container that was created but could not start; a failure here is only logged, as the
    start failure is what the caller must hear about (and a later create replaces the container)."""
    try:
        api.remove_container(container_id, v=True, force=True)
    except Exception as exc:
        log.warning("%s: could not remove container %s after its failed start: %s", worker, name,
                    clip(str(exc)))


def foreign(worker: str, name: str, action: str) -> NodeError:
    return NodeError(kind="foreign", worker=worker, message=(
        f"{worker}: container {name} was not made by lmstack (it has no {LABEL_DEPLOYMENT} label), so lmstack "
        f"will not {action} it; remove or rename it yourself, or give the deployment another name"))


def gpu_list(gpus: Iterable[int]) -> str:
    return ",".join(str(i) for i in gpus)

