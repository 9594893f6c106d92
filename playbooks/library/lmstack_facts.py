#!/usr/bin/python
"""lmstack_facts: what lmstack needs to know about a worker, gathered on the worker itself.

Each fact is collected by running something (NVML, nvidia-smi, docker, /proc, statvfs) and turned into
data by a pure function (`parse_*`, `unmanaged_memory`, ...), so the parsing is tested without Ansible
or GPUs. Runs on the worker's Python (3.8+): standard library only, pynvml when it is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ansible.module_utils.basic import AnsibleModule

if TYPE_CHECKING:  # annotations only: the worker's Python may be 3.8
    from collections.abc import Callable, Iterable, Mapping

    Runner = Callable[[list[str]], tuple[int, str, str]]

DOCUMENTATION = r"""
module: lmstack_facts
short_description: GPUs (NVML, else nvidia-smi), Docker, CPU, memory and model-cache disk of a worker
options:
  model_cache:
    description: The model cache directory; disk space is reported for it, or for its nearest
      existing parent when it does not exist yet. A cache that is a symlink is refused (disk.error).
    type: str
    default: /var/lib/lmstack/models
  gpu_source:
    description: Where to read GPUs from. C(auto) tries NVML, then nvidia-smi.
    type: str
    choices: [auto, nvml, nvidia-smi]
    default: auto
  managed_label:
    description: The container label that marks containers lmstack started; GPU memory of processes
      outside such containers counts as unmanaged.
    type: str
    default: lmstack.deployment
"""

RETURN = r"""
facts:
  description: gpus (index, uuid, name, memory_total, memory_used, memory_unmanaged, utilization,
    processes; processes_error when they could not be listed), gpu_source (nvml, nvidia-smi, none),
    gpu_error, docker_version, docker_error, nvidia_runtime, docker_runtimes, cpus, memory_total,
    disk (path, requested, free, total; error when they could not be read, or when the model cache is a
    symlink). Memory and disk in bytes.
  type: dict
  returned: always
"""

MIB = 1024 * 1024
GPU_QUERY = "index,uuid,name,memory.total,memory.used,utilization.gpu"
APPS_QUERY = "pid,used_memory,gpu_uuid"


# --- pure: parsing ---------------------------------------------------------------------------------


def _number(text: str) -> int | None:
    """An integer from nvidia-smi's CSV; None for `[N/A]`, `[Not Supported]`, `[Insufficient Permissions]`."""
    value = text.strip()
    if not value or value.startswith("["):
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _mib(text: str) -> int | None:
    value = _number(text)
    return None if value is None else value * MIB


def parse_nvidia_smi_gpus(text: str) -> list[dict[str, Any]]:
    """`nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu
    --format=csv,noheader,nounits`: one dict per GPU, memory in bytes, unknown values None."""
    gpus = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 6:
            continue
        index = _number(fields[0])
        if index is None:
            continue
        # A name with a comma in it splits into more fields: the name is whatever lies between.
        total, used, utilization = fields[-3:]
        gpus.append({
            "index": index,
            "uuid": fields[1],
            "name": ", ".join(fields[2:-3]),
            "memory_total": _mib(total),
            "memory_used": _mib(used),
            "utilization": _number(utilization),
        })
    return sorted(gpus, key=lambda gpu: gpu["index"])


def parse_nvidia_smi_apps(text: str) -> list[dict[str, Any]]:
    """`nvidia-smi --query-compute-apps=pid,used_memory,gpu_uuid --format=csv,noheader,nounits`."""
    apps = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3:
            continue  # e.g. "No running processes found"
        pid = _number(fields[0])
        if pid is None:
            continue
        apps.append({"pid": pid, "used_memory": _mib(fields[1]), "gpu_uuid": fields[2]})
    return apps


def parse_docker_runtimes(text: str) -> list[str]:
    """`docker info --format '{{json .Runtimes}}'`: the runtime names (`runc`, `nvidia`, ...)."""
    try:
        runtimes = json.loads(text or "null")
    except ValueError:
        return []
    return sorted(runtimes) if isinstance(runtimes, dict) else []


def parse_pids(text: str) -> list[int]:
    """One PID per line (`docker inspect --format '{{.State.Pid}}'`); 0 (not running) is dropped."""
    pids = []
    for line in text.split():
        value = _number(line)
        if value:
            pids.append(value)
    return pids


def parse_proc_stat(text: str) -> tuple[int, int] | None:
    """(pid, ppid) from /proc/PID/stat. The command name is in parentheses and may hold anything,
    spaces and parentheses included, so the fields after it are found from its last `)`."""
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    if not head or len(fields) < 2:
        return None
    try:
        return int(head.split("(", 1)[0]), int(fields[1])
    except ValueError:
        return None


def descendants(roots: Iterable[int], parents: Mapping[int, int]) -> set[int]:
    """The roots and every process below them, from a pid -> parent pid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    pending = [pid for pid in roots if pid > 0]
    while pending:
        pid = pending.pop()
        if pid in found:
            continue
        found.add(pid)
        pending.extend(children.get(pid, ()))
    return found


def unmanaged_memory(memory_used: int | None, processes: list[dict[str, Any]], managed: set[int]) -> int:
    """GPU memory held by processes lmstack did not start.

    The sum over processes outside lmstack's containers. When one of them hides its usage (`[N/A]`),
    everything on the GPU that is not known to be lmstack's counts instead: a scheduler that thinks
    memory is free when it is not starts a replica that runs out of memory.
    """
    others = [p for p in processes if p["pid"] not in managed]
    counted = sum(p["used_memory"] or 0 for p in others)
    if all(p["used_memory"] is not None for p in others):
        return counted
    ours = sum(p["used_memory"] or 0 for p in processes if p["pid"] in managed)
    return max(counted, (memory_used or 0) - ours)


def attach_processes(gpus: list[dict[str, Any]], apps: list[dict[str, Any]], managed: set[int]) -> None:
    """Add each GPU's processes (pid, used_memory, managed) and memory_unmanaged, in place.

    A GPU whose processes could not be listed (`processes_error`) counts all its used memory as
    unmanaged: nothing on it is known to be lmstack's.
    """
    for gpu in gpus:
        mine = [app for app in apps if app["gpu_uuid"] == gpu["uuid"]]
        gpu["processes"] = [
            {"pid": app["pid"], "used_memory": app["used_memory"], "managed": app["pid"] in managed}
            for app in sorted(mine, key=lambda app: app["pid"])
        ]
        if gpu.get("processes_error"):
            gpu["memory_unmanaged"] = gpu["memory_used"] or 0
        else:
            gpu["memory_unmanaged"] = unmanaged_memory(gpu["memory_used"], mine, managed)


def parse_meminfo_total(text: str) -> int | None:
    """MemTotal from /proc/meminfo, in bytes."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return None


def nearest_existing(path: str) -> Path:
    """The path itself if it exists, else its nearest existing parent (the cache dir is made later)."""
    current = Path(path)
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def symlinked_cache(path: str) -> str | None:
    """Why the model cache `path` is refused: it is a symlink (containers mount the cache read-write, so one
    may have made it; lmstack never follows it). Its parents are the operator's. None: it is not one."""
    if not Path(path).is_symlink():
        return None
    try:
        target = f" (to {os.readlink(path)})"  # noqa: PTH115 (Path.readlink is 3.9+; the worker may have 3.8)
    except OSError:
        target = ""
    return (f"the model cache {path} is a symlink{target}: refused, lmstack never follows one there (a container "
            "that mounts a cache may have made it); make it a plain directory")


def first_line(*texts: str) -> str:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return ""


# --- collecting ------------------------------------------------------------------------------------


class GpuReadError(Exception):
    pass


def read_nvml() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """GPUs and compute processes through NVML. Raises GpuReadError when NVML cannot be used."""
    try:
        import pynvml
    except ImportError as exc:
        raise GpuReadError("pynvml is not installed") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise GpuReadError(str(exc)) from exc
    try:
        gpus, apps = [], []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization: int | None = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None
            gpus.append({
                "index": index,
                "uuid": uuid,
                "name": _text(pynvml.nvmlDeviceGetName(handle)),
                "memory_total": int(memory.total),
                "memory_used": int(memory.used),
                "utilization": utilization,
            })
            try:
                processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except pynvml.NVMLError as exc:
                gpus[-1]["processes_error"] = str(exc)
                processes = []
            for process in processes:
                used = process.usedGpuMemory
                apps.append({"pid": int(process.pid), "used_memory": None if used is None else int(used),
                             "gpu_uuid": uuid})
        return gpus, apps
    except pynvml.NVMLError as exc:
        raise GpuReadError(str(exc)) from exc
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_nvidia_smi(binary: str, run: Runner) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rc, out, err = run([binary, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"])
    if rc != 0:
        raise GpuReadError(first_line(out, err) or f"exited with status {rc}")
    gpus = parse_nvidia_smi_gpus(out)
    rc, out, err = run([binary, f"--query-compute-apps={APPS_QUERY}", "--format=csv,noheader,nounits"])
    if rc != 0:
        for gpu in gpus:
            gpu["processes_error"] = first_line(out, err) or f"exited with status {rc}"
        return gpus, []
    return gpus, parse_nvidia_smi_apps(out)


def read_gpus(
    source: str, which: Callable[[str], str | None], run: Runner
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """(gpu_source, gpus, compute processes, why not) — NVML first, nvidia-smi second."""
    reasons = []
    if source in ("auto", "nvml"):
        try:
            gpus, apps = read_nvml()
            return "nvml", gpus, apps, None
        except GpuReadError as exc:
            reasons.append(f"NVML: {exc}")
    if source in ("auto", "nvidia-smi"):
        binary = which("nvidia-smi")
        if binary is None:
            reasons.append("nvidia-smi not found")
        else:
            try:
                gpus, apps = read_nvidia_smi(binary, run)
                return "nvidia-smi", gpus, apps, None
            except GpuReadError as exc:
                reasons.append(f"nvidia-smi: {exc}")
    return "none", [], [], "; ".join(reasons)


def read_docker(docker: str | None, run: Runner) -> dict[str, Any]:
    if docker is None:
        return {"docker_version": None, "docker_error": "docker not found", "nvidia_runtime": False,
                "docker_runtimes": []}
    rc, out, err = run([docker, "version", "--format", "{{.Server.Version}}"])
    version = out.strip()
    if rc != 0 or not version:
        reason = first_line(err, out) or f"docker version: exit status {rc}"
        return {"docker_version": None, "docker_error": reason, "nvidia_runtime": False,
                "docker_runtimes": []}
    rc, out, _ = run([docker, "info", "--format", "{{json .Runtimes}}"])
    runtimes = parse_docker_runtimes(out) if rc == 0 else []
    return {"docker_version": version, "docker_error": None, "nvidia_runtime": "nvidia" in runtimes,
            "docker_runtimes": runtimes}


def managed_pids(docker: str | None, label: str, run: Runner) -> set[int]:
    """Every process in a running container that carries `label`, children included."""
    if docker is None:
        return set()
    rc, out, _ = run([docker, "ps", "--filter", f"label={label}", "--quiet", "--no-trunc"])
    containers = out.split() if rc == 0 else []
    if not containers:
        return set()
    rc, out, _ = run([docker, "inspect", "--format", "{{.State.Pid}}", *containers])
    roots = parse_pids(out) if rc == 0 else []
    return descendants(roots, read_process_parents()) if roots else set()


def read_process_parents(proc: Path = Path("/proc")) -> dict[int, int]:
    parents = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parsed = parse_proc_stat((entry / "stat").read_text())
        except OSError:
            continue  # exited meanwhile
        if parsed is not None:
            parents[parsed[0]] = parsed[1]
    return parents


def read_host(model_cache: str) -> dict[str, Any]:
    try:
        memory_total = parse_meminfo_total(Path("/proc/meminfo").read_text())
    except OSError:
        memory_total = None
    refused = symlinked_cache(model_cache)
    where = Path(model_cache) if refused is not None else nearest_existing(model_cache)
    disk: dict[str, Any] = {"path": str(where), "requested": model_cache, "free": None, "total": None}
    if refused is not None:  # not even its free space is read through it
        disk["error"] = refused
    else:
        try:
            stat = os.statvfs(where)
            disk.update(free=stat.f_bavail * stat.f_frsize, total=stat.f_blocks * stat.f_frsize)
        except OSError as exc:
            disk["error"] = str(exc)
    return {"cpus": os.cpu_count(), "memory_total": memory_total, "disk": disk}


def gather(params: Mapping[str, Any], which: Callable[[str], str | None], run: Runner) -> dict[str, Any]:
    source, gpus, apps, gpu_error = read_gpus(params["gpu_source"], which, run)
    docker = which("docker")
    facts: dict[str, Any] = {"gpu_source": source, "gpu_error": gpu_error}
    facts.update(read_docker(docker, run))
    # Only worth asking Docker (and walking /proc) when something runs on a GPU.
    managed = managed_pids(docker, params["managed_label"], run) if apps else set()
    attach_processes(gpus, apps, managed)
    facts["gpus"] = gpus
    facts.update(read_host(params["model_cache"]))
    return facts


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "model_cache": {"type": "str", "default": "/var/lib/lmstack/models"},
            "gpu_source": {"type": "str", "default": "auto", "choices": ["auto", "nvml", "nvidia-smi"]},
            "managed_label": {"type": "str", "default": "lmstack.deployment"},
        },
        supports_check_mode=True,
    )

    def which(name: str) -> str | None:
        return module.get_bin_path(name)

    def run(args: list[str]) -> tuple[int, str, str]:
        rc, out, err = module.run_command(args, environ_update={"LC_ALL": "C"})
        return rc, out, err

    module.exit_json(changed=False, facts=gather(module.params, which, run))


if __name__ == "__main__":
    main()
