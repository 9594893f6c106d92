"""Node preparation: make every worker ready for the replicas the desired state may put on it.

One Ansible run over the workers' hosts (`playbooks/prepare.yml`, module `lmstack_prepare`): Docker present
and answering, the NVIDIA container toolkit where GPU replicas may run, the model cache directory, the
images pulled ahead of a rollout, and the model files some backends need in the model cache (llama.cpp's
`hf://` GGUF files), downloaded where they are missing. Checks only unless `install`. What each worker
needs is decided here from the desired state (`worker_needs`, pure); the adapter returns per-host data and
this module turns it into a report: per worker ok or failed with the reasons, and what was changed.
Nothing is stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from lmstack.backends import ModelDownload, backend_for, effective_spec
from lmstack.gitsource import Source
from lmstack.manifests import DesiredState
from lmstack.manifests.schema import Deployment, Worker
from lmstack.nodes.ansible import PLAYBOOKS_DIR, AnsibleSetupError, HostRun, run_playbook
from lmstack.reconcile.facts import INVENTORY_FILE, runner_inventory

PREPARE_PLAYBOOK = "prepare.yml"
PREPARE_MODULE = "lmstack_prepare"
DEFAULT_PULL_TIMEOUT_S = 1800

ImageStatus = Literal["present", "pulled", "failed", "skipped"]
IMAGE_STATUSES: tuple[ImageStatus, ...] = ("present", "pulled", "failed", "skipped")
ModelStatus = Literal["present", "downloaded", "failed", "skipped"]
MODEL_STATUSES: tuple[ModelStatus, ...] = ("present", "downloaded", "failed", "skipped")


class PrepareError(Exception):
    """Preparation could not be run at all (no key, no known_hosts, no playbook); nothing was done."""


# --- what each worker needs (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerNeeds:
    images: tuple[str, ...]  # in deployment-name order, each once
    needs_gpu_runtime: bool
    deployments: tuple[str, ...]  # the deployments that may be placed on the worker
    models: tuple[ModelDownload, ...] = ()  # model files to have in the model cache, each path once


def may_place(deployment: Deployment, worker: Worker) -> bool:
    """Whether the scheduler may put a replica of `deployment` on `worker`, whatever its free GPUs now:
    the placement's workers list and selector, and enough GPUs lmstack may use there (by the spec)."""
    spec = deployment.spec
    if spec.replicas == 0:
        return False
    placement = spec.placement
    if placement.workers and worker.metadata.name not in placement.workers:
        return False
    if any(worker.metadata.labels.get(key) != value for key, value in placement.selector.items()):
        return False
    allowed = worker.spec.gpus
    return spec.resources.gpus == 0 or allowed == "all" or len(allowed) >= spec.resources.gpus


def worker_needs(desired: DesiredState) -> dict[str, WorkerNeeds]:
    """Per worker: the (effective) images of every deployment that may be placed on it, and whether any of
    those uses GPUs (then the worker needs the NVIDIA runtime)."""
    needs = {}
    for name, worker in sorted(desired.workers.items()):
        images: dict[str, None] = {}
        models: dict[str, ModelDownload] = {}
        gpu = False
        placed = []
        for deployment_name, deployment in sorted(desired.deployments.items()):
            if not may_place(deployment, worker):
                continue
            placed.append(deployment_name)
            spec = effective_spec(deployment_name, deployment.spec)
            images.setdefault(spec.image, None)
            download = backend_for(spec.backend).model_download(spec)
            if download is not None:
                models.setdefault(download.path, download)
            gpu = gpu or spec.resources.gpus > 0
        needs[name] = WorkerNeeds(images=tuple(images), needs_gpu_runtime=gpu, deployments=tuple(placed),
                                  models=tuple(models.values()))
    return needs


# --- the report --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerCheck:
    ok: bool
    version: str | None
    error: str | None
    installed: bool = False
    started: bool = False


@dataclass(frozen=True)
class NvidiaCheck:
    required: bool
    ok: bool  # toolkit on PATH and the nvidia runtime registered with Docker
    toolkit: str | None  # path of nvidia-ctk or nvidia-container-runtime
    runtime: bool
    runtimes: tuple[str, ...]
    error: str | None  # set when required and not ok
    installed: bool = False
    configured: bool = False


@dataclass(frozen=True)
class CacheCheck:
    path: str
    ok: bool
    created: bool
    error: str | None


@dataclass(frozen=True)
class ImageCheck:
    image: str
    status: ImageStatus
    error: str | None = None


@dataclass(frozen=True)
class ModelCheck:
    source: str  # the reference the manifest gives (hf://...)
    path: str  # relative to the model cache
    status: ModelStatus
    error: str | None = None
    bytes: int | None = None  # downloaded now: the file's size
    seconds: float | None = None
    resumed_from: int | None = None  # bytes a .part held before this download (0: from the start)
    # what the download's sha256 was checked against: the reference's pin, the sha256 the server announced
    # (Hugging Face's X-Linked-Etag), or None (not checked)
    sha256_checked: Literal["pinned", "announced"] | None = None


@dataclass(frozen=True)
class WorkerPrepared:
    """One worker after preparation. `docker`, `nvidia`, `cache` are None when the host gave no result
    (unreachable, refused, timed out): `problems` then holds why."""

    worker: str
    host: str
    needs_gpu_runtime: bool
    images_wanted: tuple[str, ...]
    model_cache: str
    docker: DockerCheck | None = None
    nvidia: NvidiaCheck | None = None
    cache: CacheCheck | None = None
    images: tuple[ImageCheck, ...] = ()
    models: tuple[ModelCheck, ...] = ()
    changes: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()  # one sentence each; empty: the worker is ready
    # None when ok; else unreachable, auth_failed, host_key, module_failed, no_result (from the adapter),
    # or not_ready (the host answered, something it needs is missing)
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> Literal["ok", "failed"]:
        return "ok" if self.ok else "failed"

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def reason(self) -> str | None:
        return "; ".join(self.problems) if self.problems else None

    def count(self, status: ImageStatus) -> int:
        return sum(1 for image in self.images if image.status == status)


@dataclass(frozen=True)
class PrepareReport:
    workers: tuple[WorkerPrepared, ...]  # sorted by worker name
    prepared_at: datetime
    elapsed_s: float
    install: bool
    messages: tuple[str, ...] = field(default=())  # Ansible's own, when a host has no result

    @property
    def failed(self) -> tuple[WorkerPrepared, ...]:
        return tuple(worker for worker in self.workers if not worker.ok)

    @property
    def changed(self) -> tuple[WorkerPrepared, ...]:
        return tuple(worker for worker in self.workers if worker.changed)

    def to_json(self) -> dict[str, Any]:
        return {
            "preparedAt": self.prepared_at.isoformat(),
            "elapsedSeconds": round(self.elapsed_s, 3),
            "install": self.install,
            "workers": [_worker_json(worker) for worker in self.workers],
        }


def _worker_json(w: WorkerPrepared) -> dict[str, Any]:
    return {
        "name": w.worker,
        "host": w.host,
        "status": w.status,
        "changed": w.changed,
        "problems": list(w.problems),
        "errorKind": w.error_kind,
        "changes": list(w.changes),
        "docker": None if w.docker is None else {
            "ok": w.docker.ok, "version": w.docker.version, "error": w.docker.error,
            "installed": w.docker.installed, "started": w.docker.started},
        "nvidiaRuntime": None if w.nvidia is None else {
            "required": w.nvidia.required, "ok": w.nvidia.ok, "toolkit": w.nvidia.toolkit,
            "runtime": w.nvidia.runtime, "runtimes": list(w.nvidia.runtimes), "error": w.nvidia.error,
            "installed": w.nvidia.installed, "configured": w.nvidia.configured},
        "needsGpuRuntime": w.needs_gpu_runtime,
        "modelCache": {"path": w.model_cache, "ok": w.cache.ok if w.cache else None,
                       "created": w.cache.created if w.cache else None, "error": w.cache.error if w.cache else None},
        "images": [{"image": image.image, "status": image.status, "error": image.error} for image in w.images],
        "imagesWanted": list(w.images_wanted),
        "models": [{"source": m.source, "path": m.path, "status": m.status, "error": m.error, "bytes": m.bytes,
                    "seconds": m.seconds, "resumedFrom": m.resumed_from, "sha256Checked": m.sha256_checked}
                   for m in w.models],
    }


# --- running it --------------------------------------------------------------------------------------------


def prepare_workers(
    source: Source,
    *,
    ssh_key: Path,
    known_hosts: Path,
    ssh_config: Path | None = None,
    install: bool = False,
    images: Mapping[str, Sequence[str]] | None = None,
    workers: Collection[str] | None = None,
    forks: int = 20,
    timeout_s: int | None = None,
    pull_timeout_s: int = DEFAULT_PULL_TIMEOUT_S,
    cancel: Callable[[], bool] | None = None,
    playbooks_dir: Path = PLAYBOOKS_DIR,
) -> PrepareReport:
    """Prepare the workers of `source` (all, or those named in `workers`) in one Ansible run.

    `images` maps a worker name to the images to have there (e.g. exactly what a rollout will start);
    None: every image of every deployment that may be placed on the worker (`worker_needs`). Whether a
    worker needs the NVIDIA runtime always comes from the desired state. Raises PrepareError when nothing
    could be run. `timeout_s` bounds the whole run (default: 10 minutes plus `pull_timeout_s` for each
    image of the worker with the most); one pull gives up after `pull_timeout_s`. `ssh_config` is the
    operator's (jump hosts, SSH options).

    What comes from the manifests (images, model files, the cache directory) reaches the playbook as host
    variables that ansible never renders as templates; only lmstack's own flags are extra variables.
    """
    desired = source.desired
    chosen = sorted(desired.workers if workers is None else set(workers) & set(desired.workers))
    needs = worker_needs(desired)
    wanted = {
        name: needs[name].images if images is None else tuple(dict.fromkeys(images.get(name, ())))
        for name in chosen
    }
    host_of = {name: desired.workers[name].spec.host for name in chosen}
    cache_of = {name: desired.workers[name].spec.model_cache for name in chosen}
    host_vars: dict[str, dict[str, object]] = {
        host_of[name]: {
            "lmstack_model_cache": cache_of[name],
            "lmstack_images": list(wanted[name]),
            "lmstack_needs_gpu_runtime": needs[name].needs_gpu_runtime,
            "lmstack_models": [_model_param(model) for model in needs[name].models],
        }
        for name in chosen
    }
    if timeout_s is None:
        timeout_s = 600 + pull_timeout_s * max((len(wanted[name]) + len(needs[name].models) for name in chosen),
                                               default=0)
    started = time.monotonic()
    try:
        run = run_playbook(
            PREPARE_PLAYBOOK,
            inventory={INVENTORY_FILE: runner_inventory(source.inventory).encode()},
            hosts=sorted(set(host_of.values())),
            ssh_key=ssh_key,
            known_hosts=known_hosts,
            ssh_config=ssh_config,
            host_vars=host_vars,
            extravars={"lmstack_install": install, "lmstack_pull_timeout": pull_timeout_s},
            forks=forks,
            timeout_s=timeout_s,
            cancel=cancel,
            playbooks_dir=playbooks_dir,
        )
    except AnsibleSetupError as exc:
        raise PrepareError(str(exc)) from exc
    elapsed = time.monotonic() - started
    results = tuple(
        worker_result(name, host_of[name], run.hosts[host_of[name]], needs_gpu_runtime=needs[name].needs_gpu_runtime,
                      images_wanted=wanted[name], model_cache=cache_of[name])
        for name in chosen
    )
    return PrepareReport(workers=results, prepared_at=datetime.now(UTC), elapsed_s=elapsed, install=install,
                         messages=run.messages)


def worker_result(
    worker: str, host: str, outcome: HostRun, *, needs_gpu_runtime: bool, images_wanted: tuple[str, ...],
    model_cache: str,
) -> WorkerPrepared:
    """One host's outcome as the worker's result: the module's findings when it ran, else the error."""
    base = WorkerPrepared(worker=worker, host=host, needs_gpu_runtime=needs_gpu_runtime,
                          images_wanted=images_wanted, model_cache=model_cache)
    found = next((r.result.get("prepare") for r in outcome.results if r.action.endswith(PREPARE_MODULE)), None)
    if not isinstance(found, Mapping):
        error = outcome.error
        reason = str(error) if error is not None else f"{PREPARE_MODULE} returned no result"
        return replace(base, problems=(reason,), error_kind=error.kind if error is not None else "module_failed")
    problems = [str(problem) for problem in _list(found.get("problems"))]
    if not problems and not found.get("ok"):
        problems.append("the worker is not ready (no reason given)")
    if outcome.error is not None and outcome.error.task is not None and not problems:
        problems.append(str(outcome.error))  # failed after the module, for a reason of its own
    docker = _dict(found.get("docker"))
    nvidia = _dict(found.get("nvidia"))
    cache = _dict(found.get("model_cache"))
    return replace(
        base,
        docker=DockerCheck(ok=bool(docker.get("ok")), version=_str(docker.get("version")),
                           error=_str(docker.get("error")), installed=bool(docker.get("installed")),
                           started=bool(docker.get("started"))),
        nvidia=NvidiaCheck(required=bool(nvidia.get("required")), ok=bool(nvidia.get("ok")),
                           toolkit=_str(nvidia.get("toolkit")), runtime=bool(nvidia.get("runtime")),
                           runtimes=tuple(str(r) for r in _list(nvidia.get("runtimes"))),
                           error=_str(nvidia.get("error")), installed=bool(nvidia.get("installed")),
                           configured=bool(nvidia.get("configured"))),
        cache=CacheCheck(path=str(cache.get("path") or model_cache), ok=bool(cache.get("ok")),
                         created=bool(cache.get("created")), error=_str(cache.get("error"))),
        images=tuple(_image(item) for item in _list(found.get("images")) if isinstance(item, Mapping)),
        models=tuple(_model(item) for item in _list(found.get("models")) if isinstance(item, Mapping)),
        changes=tuple(str(change) for change in _list(found.get("changes"))),
        problems=tuple(problems),
        error_kind="not_ready" if problems else None,
    )


def _model_param(model: ModelDownload) -> dict[str, Any]:
    return {"source": model.source, "url": model.url, "path": model.path, "sha256": model.sha256}


def _model(item: Mapping[str, Any]) -> ModelCheck:
    status = str(item.get("status"))
    known: ModelStatus = next((s for s in MODEL_STATUSES if s == status), "failed")
    return ModelCheck(source=str(item.get("source")), path=str(item.get("path")), status=known,
                      error=_str(item.get("error")), bytes=_int(item.get("bytes")),
                      seconds=float(item["seconds"]) if isinstance(item.get("seconds"), int | float) else None,
                      resumed_from=_int(item.get("resumed_from")),
                      sha256_checked=next((c for c in ("pinned", "announced") if c == item.get("sha256_checked")),
                                          None))


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _image(item: Mapping[str, Any]) -> ImageCheck:
    status = str(item.get("status"))
    known: ImageStatus = next((s for s in IMAGE_STATUSES if s == status), "failed")
    return ImageCheck(image=str(item.get("image")), status=known, error=_str(item.get("error")))


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _str(value: object) -> str | None:
    return None if value is None or value == "" else str(value)
