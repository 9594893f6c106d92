"""How lmstack reaches each worker (`WorkerAccess`): shared by `apply` (every worker of a pass), `plan` (what it
shows a reviewer) and the API's live logs (one worker)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from lmstack.gitsource import InventoryHost, Source
from lmstack.state.models import Worker as WorkerRow

DEFAULT_MODEL_CACHE = "/var/lib/lmstack/models"
# The operator's local host (PushLimits.local_host) runs its engines with host networking on this machine.
LOCAL_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class WorkerAccess:
    """How to reach a worker: its Docker endpoint, its address for HTTP (engine endpoints), its model cache."""

    name: str
    docker_url: str
    address: str
    model_cache: str


def worker_access(source: Source, session: Session) -> dict[str, WorkerAccess]:
    """Every worker in the manifests, and the workers that left the manifests but still have rows (their host
    from the database, if still in the inventory), by name."""
    hosts = source.inventory.hosts
    found: dict[str, WorkerAccess] = {}
    local_docker = source.limits.local_docker
    for name, worker in source.desired.workers.items():
        host = hosts.get(worker.spec.host)
        if host is None:
            continue
        if host.local:
            found[name] = WorkerAccess(name, local_docker, LOCAL_ADDRESS, worker.spec.model_cache)
            continue
        # A dockerHost in the manifest was checked against the operator's limits when the source was loaded.
        url = worker.spec.docker_host or default_docker_url(host)
        found[name] = WorkerAccess(name, url, host.address, worker.spec.model_cache)
    for row in session.scalars(select(WorkerRow)):
        if row.name in found or row.host not in hosts:
            continue
        host = hosts[row.host]
        cache = str((row.spec or {}).get("modelCache", DEFAULT_MODEL_CACHE))
        if host.local:
            found[row.name] = WorkerAccess(row.name, local_docker, LOCAL_ADDRESS, cache)
        else:
            found[row.name] = WorkerAccess(row.name, default_docker_url(host), host.address, cache)
    return found


def default_docker_url(host: InventoryHost) -> str:
    """Docker over SSH to the inventory host itself: the only endpoint a Worker gets without the operator."""
    return f"ssh://{host.user or 'root'}@{host.address}:{host.port}"
