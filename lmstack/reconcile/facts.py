"""Node facts: gather them from every worker in the desired state, and record them on the worker rows.

Gathering is one Ansible run over all the workers' hosts (`playbooks/facts.yml`). A worker whose facts
could not be gathered keeps its previous facts for display, and gets `facts_error`: the planner then
treats it as NotReady with that reason, so a machine that went away stops receiving replicas.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert

from lmstack.gitsource import Inventory, Source
from lmstack.nodes.ansible import PLAYBOOKS_DIR, AnsibleSetupError, HostError, inventory_yaml, run_facts
from lmstack.state import Database, Worker

INVENTORY_FILE = "lmstack.yml"


class FactsError(Exception):
    """Facts could not be gathered at all (no key, no known_hosts, no playbook); nothing was recorded."""


@dataclass(frozen=True)
class WorkerFacts:
    """One worker after a gathering: the facts now stored for it, and the error if this gathering failed."""

    worker: str
    host: str
    facts: Mapping[str, Any] | None  # fresh facts, or (on error) the previous ones, None if never gathered
    facts_at: datetime | None  # when `facts` were gathered
    error: str | None = None  # what is stored as facts_error: "KIND: message"
    error_kind: str | None = None  # unreachable, auth_failed, host_key, module_failed, no_result

    @property
    def ready(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class FactsReport:
    workers: tuple[WorkerFacts, ...]  # sorted by worker name
    gathered_at: datetime
    elapsed_s: float

    @property
    def failed(self) -> tuple[WorkerFacts, ...]:
        return tuple(worker for worker in self.workers if not worker.ready)

    def to_json(self) -> dict[str, Any]:
        return {
            "gatheredAt": self.gathered_at.isoformat(),
            "elapsedSeconds": round(self.elapsed_s, 3),
            "workers": [
                {
                    "name": w.worker,
                    "host": w.host,
                    "ready": w.ready,
                    "error": w.error,
                    "errorKind": w.error_kind,
                    "factsAt": w.facts_at.isoformat() if w.facts_at else None,
                    "facts": dict(w.facts) if w.facts is not None else None,
                }
                for w in self.workers
            ],
        }


def gather_facts(
    source: Source,
    database: Database,
    *,
    ssh_key: Path,
    known_hosts: Path,
    ssh_config: Path | None = None,
    forks: int = 20,
    timeout_s: int = 300,
    cancel: Callable[[], bool] | None = None,
    playbooks_dir: Path = PLAYBOOKS_DIR,
) -> FactsReport:
    """Gather facts from every worker of `source` in one Ansible run and upsert their `workers` rows.

    `ssh_config` is the operator's (jump hosts, SSH options): connection options never come from Git.
    Raises FactsError when nothing could be run (then no row is touched).
    """
    workers = source.desired.workers
    host_of = {name: worker.spec.host for name, worker in sorted(workers.items())}
    started = time.monotonic()
    try:
        gathered = run_facts(
            {INVENTORY_FILE: runner_inventory(source.inventory).encode()},
            sorted(set(host_of.values())),
            ssh_key=ssh_key,
            known_hosts=known_hosts,
            ssh_config=ssh_config,
            model_cache={worker.spec.host: worker.spec.model_cache for worker in workers.values()},
            forks=forks,
            timeout_s=timeout_s,
            cancel=cancel,
            playbooks_dir=playbooks_dir,
        )
    except AnsibleSetupError as exc:
        raise FactsError(str(exc)) from exc
    elapsed = time.monotonic() - started
    now = datetime.now(UTC)

    results: list[WorkerFacts] = []
    with database.session() as session:
        for name, host in host_of.items():
            worker = workers[name]
            outcome = gathered[host]
            identity = {
                "host": host,
                "labels": dict(worker.metadata.labels),
                "spec": worker.spec.model_dump(mode="json", by_alias=True),
            }
            changes: dict[str, Any]
            if isinstance(outcome, HostError):
                # The old facts stay (for display); the error makes the worker NotReady.
                changes = {**identity, "facts_error": str(outcome)}
            else:
                changes = {**identity, "facts": worker_facts(outcome.facts), "facts_at": now, "facts_error": None}
            # ON CONFLICT: two gatherers (or a gatherer and a sync) may meet a new worker at once.
            upsert = insert(Worker).values(name=name, **changes).on_conflict_do_update(
                index_elements=[Worker.name], set_={**changes, "updated_at": func.now()}
            ).returning(Worker.facts, Worker.facts_at)
            stored_facts, stored_at = session.execute(upsert).one()
            results.append(WorkerFacts(
                worker=name,
                host=host,
                facts=stored_facts,
                facts_at=stored_at,
                error=str(outcome) if isinstance(outcome, HostError) else None,
                error_kind=outcome.kind if isinstance(outcome, HostError) else None,
            ))
    return FactsReport(workers=tuple(results), gathered_at=now, elapsed_s=elapsed)


def worker_facts(module: Mapping[str, Any]) -> dict[str, Any]:
    """The lmstack_facts module's output in the shape stored in `workers.facts` (memory in bytes).

    The planner reads `gpus[].index`, `memory_total` and `memory_unmanaged`; unknown numbers are 0 there
    (a GPU whose memory is unknown has none to offer), and None elsewhere.
    """
    disk = module.get("disk") or {}
    return {
        "gpus": [
            {
                "index": int(gpu["index"]),
                "uuid": str(gpu.get("uuid") or ""),
                "name": str(gpu.get("name") or ""),
                "memory_total": int(gpu.get("memory_total") or 0),
                "memory_used": _int_or_none(gpu.get("memory_used")),
                "memory_unmanaged": int(gpu.get("memory_unmanaged") or 0),
                "utilization": _int_or_none(gpu.get("utilization")),
            }
            for gpu in module.get("gpus") or []
        ],
        "gpu_source": module.get("gpu_source"),
        "gpu_error": module.get("gpu_error"),
        "docker_version": module.get("docker_version"),
        "docker_error": module.get("docker_error"),
        "nvidia_runtime": bool(module.get("nvidia_runtime")),
        "cpus": _int_or_none(module.get("cpus")),
        "memory_total": _int_or_none(module.get("memory_total")),
        "disk_path": disk.get("path"),
        "disk_free": _int_or_none(disk.get("free")),
        "disk_total": _int_or_none(disk.get("total")),
        # Why the cache's disk could not be read, or why the cache is refused (a symlink): shown, not lost.
        "disk_error": str(disk["error"]) if disk.get("error") else None,
    }


def _int_or_none(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def runner_inventory(inventory: Inventory) -> str:
    """The inventory ansible-playbook gets: each host with only the connection values lmstack decided from the
    validated inventory (address, port, user, Python), over ssh; the operator's local host (`local`) through
    Ansible's local connection. No other variable from Git reaches ansible
    (our playbooks need none), so nothing in the repository can configure how ansible connects or runs.

    Strings are written `!unsafe` (ansible never renders them). Data for the playbooks (model cache, images)
    goes to run_playbook as host_vars, written the same way.
    """
    hosts: dict[str, dict[str, object]] = {}
    for name, host in inventory.hosts.items():
        if host.local:
            # This machine, as the operator decided (never the repository): no SSH; the modules run with this
            # process's Python (and its environment: DOCKER_HOST reaches the docker CLI they call).
            hosts[name] = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
            continue
        values: dict[str, object] = {"ansible_connection": "ssh", "ansible_host": host.address,
                                     "ansible_port": host.port}
        if host.user is not None:
            values["ansible_user"] = host.user
        if host.python_interpreter is not None:
            values["ansible_python_interpreter"] = host.python_interpreter
        hosts[name] = values
    return inventory_yaml(hosts)
