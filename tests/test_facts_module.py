"""The lmstack_facts Ansible module without Ansible: its pure parsers, the unmanaged-memory rule, and the
module file run as a real process (`python lmstack_facts.py args.json`) with a fake `nvidia-smi`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import playbook_modules
import pytest

MODULE_PATH = playbook_modules.path("lmstack_facts")
MIB = 1024 * 1024


facts = playbook_modules.load("lmstack_facts")

# `nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu
#  --format=csv,noheader,nounits` on an 8-GPU box, shortened to four, with the oddities seen in the wild.
GPUS_CSV = """\
0, GPU-1d5e2c3a-8f4b-4c1e-9a7d-2b6f0e9c8a11, NVIDIA H100 80GB HBM3, 81559, 74312, 97
1, GPU-7a0b9c8d-1e2f-4a3b-8c5d-6e7f8a9b0c22, NVIDIA H100 80GB HBM3, 81559, 0, 0
2, GPU-3c4d5e6f-7a8b-4c9d-0e1f-2a3b4c5d6e33, NVIDIA H100 80GB HBM3, 81559, 1, [N/A]
3, GPU-9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b44, NVIDIA A100-SXM4-40GB, [N/A], [N/A], [Not Supported]
"""
APPS_CSV = """\
4242, 40960, GPU-1d5e2c3a-8f4b-4c1e-9a7d-2b6f0e9c8a11
4343, 32768, GPU-1d5e2c3a-8f4b-4c1e-9a7d-2b6f0e9c8a11
5151, [N/A], GPU-3c4d5e6f-7a8b-4c9d-0e1f-2a3b4c5d6e33
"""


def test_gpus_parsed_with_memory_in_bytes_and_unknowns_as_none() -> None:
    gpus = facts.parse_nvidia_smi_gpus(GPUS_CSV)
    assert [gpu["index"] for gpu in gpus] == [0, 1, 2, 3]
    assert gpus[0] == {
        "index": 0,
        "uuid": "GPU-1d5e2c3a-8f4b-4c1e-9a7d-2b6f0e9c8a11",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total": 81559 * MIB,
        "memory_used": 74312 * MIB,
        "utilization": 97,
    }
    assert gpus[2]["utilization"] is None
    assert gpus[3]["name"] == "NVIDIA A100-SXM4-40GB"
    assert gpus[3]["memory_total"] is None and gpus[3]["memory_used"] is None
    assert gpus[3]["utilization"] is None


def test_gpus_parser_tolerates_names_with_commas_order_and_noise() -> None:
    text = ("1, GPU-b, Tesla V100, PCIe, 16GB, 16384, 2, 5\n\nNo devices were found\n"
            "0, GPU-a, T4, 15360, 0, 0\n")
    gpus = facts.parse_nvidia_smi_gpus(text)
    assert [(gpu["index"], gpu["name"]) for gpu in gpus] == [(0, "T4"), (1, "Tesla V100, PCIe, 16GB")]
    assert gpus[1]["memory_total"] == 16384 * MIB
    assert facts.parse_nvidia_smi_gpus("") == []


def test_apps_parsed_and_unknown_memory_kept_unknown() -> None:
    apps = facts.parse_nvidia_smi_apps(APPS_CSV + "No running processes found\n")
    assert apps == [
        {"pid": 4242, "used_memory": 40960 * MIB, "gpu_uuid": "GPU-1d5e2c3a-8f4b-4c1e-9a7d-2b6f0e9c8a11"},
        {"pid": 4343, "used_memory": 32768 * MIB, "gpu_uuid": "GPU-1d5e2c3a-8f4b-4c1e-9a7d-2b6f0e9c8a11"},
        {"pid": 5151, "used_memory": None, "gpu_uuid": "GPU-3c4d5e6f-7a8b-4c9d-0e1f-2a3b4c5d6e33"},
    ]
    assert facts.parse_nvidia_smi_apps("") == []


def test_unmanaged_memory_counts_processes_outside_lmstack_containers() -> None:
    processes = [{"pid": 10, "used_memory": 40 * MIB}, {"pid": 11, "used_memory": 30 * MIB},
                 {"pid": 12, "used_memory": 2 * MIB}]
    assert facts.unmanaged_memory(72 * MIB, processes, managed=set()) == 72 * MIB
    assert facts.unmanaged_memory(72 * MIB, processes, managed={10}) == 32 * MIB
    assert facts.unmanaged_memory(72 * MIB, processes, managed={10, 11, 12}) == 0
    assert facts.unmanaged_memory(5 * MIB, [], managed=set()) == 0  # no process: nothing held


def test_unmanaged_memory_with_a_hidden_process_counts_all_that_is_not_lmstacks() -> None:
    processes = [{"pid": 10, "used_memory": 40 * MIB}, {"pid": 20, "used_memory": None}]
    # pid 20 is not lmstack's and hides its usage: everything used except lmstack's 40 MiB is unmanaged.
    assert facts.unmanaged_memory(100 * MIB, processes, managed={10}) == 60 * MIB
    # lmstack's own hidden process does not make the others' known usage uncertain.
    assert facts.unmanaged_memory(100 * MIB, processes, managed={20}) == 40 * MIB


def test_processes_attached_to_their_gpu_by_uuid() -> None:
    gpus = facts.parse_nvidia_smi_gpus(GPUS_CSV)
    apps = facts.parse_nvidia_smi_apps(APPS_CSV)
    facts.attach_processes(gpus, apps, managed={4242})
    assert gpus[0]["processes"] == [{"pid": 4242, "used_memory": 40960 * MIB, "managed": True},
                                    {"pid": 4343, "used_memory": 32768 * MIB, "managed": False}]
    assert gpus[0]["memory_unmanaged"] == 32768 * MIB
    assert gpus[1]["processes"] == [] and gpus[1]["memory_unmanaged"] == 0
    assert gpus[2]["memory_unmanaged"] == 1 * MIB  # a hidden process: all used memory
    assert gpus[3]["memory_unmanaged"] == 0


def test_gpu_whose_processes_cannot_be_listed_counts_all_used_memory() -> None:
    gpus = facts.parse_nvidia_smi_gpus(GPUS_CSV)[:1]
    gpus[0]["processes_error"] = "Function Not Found"
    facts.attach_processes(gpus, [], managed=set())
    assert gpus[0]["memory_unmanaged"] == 74312 * MIB


def test_proc_stat_parent_even_with_odd_command_names() -> None:
    assert facts.parse_proc_stat("1234 (python3) S 1 1234 1234 0 -1 4194560") == (1234, 1)
    assert facts.parse_proc_stat("77 (a) b) (c) R 76 77 77 0") == (77, 76)
    assert facts.parse_proc_stat("garbage") is None


def test_descendants_follow_the_process_tree() -> None:
    parents = {1: 0, 100: 1, 101: 100, 102: 101, 103: 100, 200: 1, 201: 200}
    assert facts.descendants([100], parents) == {100, 101, 102, 103}
    assert facts.descendants([100, 201], parents) == {100, 101, 102, 103, 201}
    assert facts.descendants([0, 999], parents) == {999}  # 0: a stopped container; 999: gone meanwhile


def test_descendants_of_a_real_process_tree_from_proc() -> None:
    # A shell whose child is a sleep: the walk over the real /proc finds the grandchild.
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        found = facts.descendants([parent.pid], facts.read_process_parents())
        assert {parent.pid, child} <= found
        assert os.getpid() not in found
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()


def test_docker_runtimes_and_pids() -> None:
    runtimes = json.dumps({"io.containerd.runc.v2": {"path": "runc"},
                           "nvidia": {"path": "nvidia-container-runtime"}, "runc": {"path": "runc"}})
    assert "nvidia" in facts.parse_docker_runtimes(runtimes)
    assert facts.parse_docker_runtimes('{"runc": {"path": "runc"}}') == ["runc"]
    assert facts.parse_docker_runtimes("") == [] and facts.parse_docker_runtimes("not json") == []
    assert facts.parse_pids("4242\n0\n4343\n") == [4242, 4343]


def test_meminfo_and_nearest_existing_directory(tmp_path: Path) -> None:
    assert facts.parse_meminfo_total("MemTotal:       32768000 kB\nMemFree: 1 kB\n") == 32768000 * 1024
    assert facts.parse_meminfo_total("") is None
    assert facts.nearest_existing(str(tmp_path / "a" / "b")) == tmp_path
    assert facts.nearest_existing(str(tmp_path)) == tmp_path


# --- the module file as a real process ---------------------------------------------------------------

FAKE_NVIDIA_SMI = """\
#!/bin/sh
# A fake nvidia-smi: canned answers to the two queries lmstack_facts makes.
case "$*" in
  *--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu*) cat "$(dirname "$0")/gpus.csv" ;;
  *--query-compute-apps=pid,used_memory,gpu_uuid*) cat "$(dirname "$0")/apps.csv" ;;
  *) echo "unexpected arguments: $*" >&2; exit 2 ;;
esac
"""
BROKEN_NVIDIA_SMI = """\
#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. \
Make sure that the latest NVIDIA driver is installed and running."
exit 9
"""


def _bin(tmp_path: Path, script: str | None) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if script is not None:
        tool = bin_dir / "nvidia-smi"
        tool.write_text(script)
        tool.chmod(0o755)
        (bin_dir / "gpus.csv").write_text(GPUS_CSV)
        (bin_dir / "apps.csv").write_text(APPS_CSV)
    return bin_dir


def _run_module(tmp_path: Path, bin_dir: Path, pythonpath: Path | None = None, **args: object) -> dict:
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    # Only the fake tools and the system's: no real nvidia-smi that may be installed elsewhere.
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LC_ALL": "C"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, str(MODULE_PATH), str(args_file)], env=env, capture_output=True,
                            text=True, timeout=60)
    output = json.loads(result.stdout)
    assert result.returncode == 0 and not output.get("failed"), result.stdout + result.stderr
    return output["facts"]


def test_module_reads_gpus_from_nvidia_smi(tmp_path: Path) -> None:
    bin_dir = _bin(tmp_path, FAKE_NVIDIA_SMI)
    cache = tmp_path / "models" / "not-yet"
    started = time.perf_counter()
    result = _run_module(tmp_path, bin_dir, gpu_source="nvidia-smi", model_cache=str(cache))
    elapsed = time.perf_counter() - started
    assert result["gpu_source"] == "nvidia-smi" and result["gpu_error"] is None
    gpus = result["gpus"]
    assert [gpu["index"] for gpu in gpus] == [0, 1, 2, 3]
    assert gpus[0]["memory_total"] == 81559 * MIB and gpus[0]["memory_used"] == 74312 * MIB
    # No lmstack container runs here: every process's memory is unmanaged.
    assert gpus[0]["memory_unmanaged"] == (40960 + 32768) * MIB
    assert [p["pid"] for p in gpus[0]["processes"]] == [4242, 4343]
    # The model cache does not exist yet: the disk of its nearest existing parent.
    assert result["disk"]["path"] == str(tmp_path) and result["disk"]["requested"] == str(cache)
    assert result["disk"]["free"] > 0 and result["disk"]["total"] >= result["disk"]["free"]
    assert result["cpus"] == os.cpu_count() and result["memory_total"] > 0
    # Docker is whatever this machine has; either a version or the reason there is none.
    assert (result["docker_version"] is None) == bool(result["docker_error"])
    assert elapsed < 30


def test_module_without_nvidia_smi_reports_none_and_why(tmp_path: Path) -> None:
    result = _run_module(tmp_path, _bin(tmp_path, None), gpu_source="nvidia-smi", model_cache=str(tmp_path))
    assert result["gpus"] == [] and result["gpu_source"] == "none"
    assert result["gpu_error"] == "nvidia-smi not found"


def test_module_with_a_failing_nvidia_smi_reports_its_message(tmp_path: Path) -> None:
    result = _run_module(tmp_path, _bin(tmp_path, BROKEN_NVIDIA_SMI), gpu_source="nvidia-smi",
                         model_cache=str(tmp_path))
    assert result["gpus"] == [] and result["gpu_source"] == "none"
    assert "couldn't communicate with the NVIDIA driver" in result["gpu_error"]


# An NVML result at the edge (allowed like a fake nvidia-smi): a `pynvml` that answers as the real one
# does for two GPUs, with the oddities of real drivers (bytes names, hidden process memory, no utilization).
FAKE_PYNVML = """\
from types import SimpleNamespace as NS


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


GPUS = [
    NS(uuid=b"GPU-aaaa", name=b"NVIDIA H200", total=143771 * 2**20, used=70000 * 2**20, util=88,
       procs=[NS(pid=7001, usedGpuMemory=60000 * 2**20), NS(pid=7002, usedGpuMemory=None)]),
    NS(uuid="GPU-bbbb", name="NVIDIA H200", total=143771 * 2**20, used=0, util=None, procs=[]),
]
state = {"init": 0}


def nvmlInit():
    state["init"] += 1


def nvmlShutdown():
    state["init"] -= 1


def nvmlDeviceGetCount():
    return len(GPUS)


def nvmlDeviceGetHandleByIndex(index):
    return GPUS[index]


def nvmlDeviceGetUUID(handle):
    return handle.uuid


def nvmlDeviceGetName(handle):
    return handle.name


def nvmlDeviceGetMemoryInfo(handle):
    return NS(total=handle.total, used=handle.used, free=handle.total - handle.used)


def nvmlDeviceGetUtilizationRates(handle):
    if handle.util is None:
        raise NVMLError_NotSupported("Not Supported")
    return NS(gpu=handle.util, memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle):
    return handle.procs
"""


def test_module_reads_gpus_through_nvml(tmp_path: Path) -> None:
    fake = tmp_path / "fake-nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    bin_dir = _bin(tmp_path, FAKE_NVIDIA_SMI)  # there, but NVML comes first
    result = _run_module(tmp_path, bin_dir, model_cache=str(tmp_path), pythonpath=fake)
    assert result["gpu_source"] == "nvml" and result["gpu_error"] is None
    first, second = result["gpus"]
    assert (first["index"], first["uuid"], first["name"]) == (0, "GPU-aaaa", "NVIDIA H200")
    assert first["memory_total"] == 143771 * MIB and first["memory_used"] == 70000 * MIB
    assert first["utilization"] == 88 and second["utilization"] is None
    # pid 7002 hides its memory: everything used that is not known to be lmstack's is unmanaged.
    assert first["memory_unmanaged"] == 70000 * MIB
    assert [p["pid"] for p in first["processes"]] == [7001, 7002]
    assert second["memory_unmanaged"] == 0 and second["processes"] == []


def _nvml_works() -> bool:
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_module_auto_falls_back_from_nvml_to_nvidia_smi(tmp_path: Path) -> None:
    if _nvml_works():
        pytest.skip("this machine has a working NVML: auto reads the real GPUs (see the next test)")
    result = _run_module(tmp_path, _bin(tmp_path, FAKE_NVIDIA_SMI), model_cache=str(tmp_path))
    assert result["gpu_source"] == "nvidia-smi" and len(result["gpus"]) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    without = _run_module(tmp_path, _bin(empty, None), model_cache=str(tmp_path))
    assert without["gpu_source"] == "none"
    assert without["gpu_error"].startswith("NVML: ")
    assert without["gpu_error"].endswith("; nvidia-smi not found")


def test_module_reads_real_gpus_through_nvml_where_there_are_some(tmp_path: Path) -> None:
    if not _nvml_works():
        pytest.skip("no NVIDIA driver on this machine")
    result = _run_module(tmp_path, _bin(tmp_path, None), gpu_source="nvml", model_cache=str(tmp_path))
    assert result["gpu_source"] == "nvml" and result["gpus"]
    for gpu in result["gpus"]:
        assert gpu["uuid"].startswith(("GPU-", "MIG-")) and gpu["memory_total"] > 0
        assert 0 <= gpu["memory_unmanaged"] <= gpu["memory_total"]


def test_module_source_is_python_38_compatible() -> None:
    # The worker's Python may be older than lmstack's: no syntax beyond 3.8 (annotations are strings).
    import ast

    ast.parse(MODULE_PATH.read_text(), feature_version=(3, 8))
