"""Where each worker's Docker is: shared by `apply` (every worker of a pass) and the API's live logs (one)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from lmstack.gitsource import InventoryHost, Source
from lmstack.reconcile.execute import WorkerTarget
from lmstack.state.models import Worker as WorkerRow

DEFAULT_MODEL_CACHE = "/var/lib/lmstack/models"


def worker_targets(source: Source, session: Session) -> dict[str, tuple[str, WorkerTarget]]:
    """Docker URL and worker target for every worker in the manifests, and for workers that left the
    manifests but still have rows (their host from the database, if still in the inventory)."""
    hosts = source.inventory.hosts
    found: dict[str, tuple[str, WorkerTarget]] = {}
    for name, worker in source.desired.workers.items():
        host = hosts.get(worker.spec.host)
        if host is None:
            continue
        # A dockerHost in the manifest was checked against the operator's limits when the source was loaded.
        url = worker.spec.docker_host or default_docker_url(host)
        found[name] = (url, WorkerTarget(name, host.address, worker.spec.model_cache))
    for row in session.scalars(select(WorkerRow)):
        if row.name in found or row.host not in hosts:
            continue
        host = hosts[row.host]
        cache = str((row.spec or {}).get("modelCache", DEFAULT_MODEL_CACHE))
        found[row.name] = (default_docker_url(host), WorkerTarget(row.name, host.address, cache))
    return found


def default_docker_url(host: InventoryHost) -> str:
    """Docker over SSH to the inventory host itself: the only endpoint a Worker gets without the operator."""
    return f"ssh://{host.user or 'root'}@{host.address}:{host.port}"
