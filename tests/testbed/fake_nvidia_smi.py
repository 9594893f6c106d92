#!/usr/bin/python3 -I
"""A fake `nvidia-smi` for one test host: the only hardware test double lmstack's tests allow.

TestBed.install_fake_nvidia_smi() copies this file as `nvidia-smi` into one host's bin directory (first
on that host's PATH, set by its sshd) next to `nvidia-smi.json`, the GPUs it reports:
    [{"index": 0, "uuid": "GPU-...", "name": "...", "memory_total": MiB, "memory_used": MiB,
      "utilization": %, "pci_bus_id": "...", "temperature": C, "power_draw": W,
      "processes": [{"pid": 1234, "process_name": "python3", "used_memory": MiB}]}]
It answers the queries lmstack's facts module makes, in the real tool's output shape:
    nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu
               --format=csv,noheader,nounits
    nvidia-smi --query-compute-apps=pid,used_memory,gpu_uuid --format=csv,noheader,nounits
and -L, --version, -i/--id, plain `nvidia-smi` (a short table). Standard library only.
"""

from __future__ import annotations

import json
import os
import sys

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nvidia-smi.json")
DRIVER, CUDA = "550.127.05", "12.4"

# field -> (key in the GPU record, unit shown without "nounits")
GPU_FIELDS = {
    "index": ("index", ""), "uuid": ("uuid", ""), "gpu_uuid": ("uuid", ""), "name": ("name", ""),
    "gpu_name": ("name", ""), "memory.total": ("memory_total", "MiB"), "memory.used": ("memory_used", "MiB"),
    "memory.free": ("memory_free", "MiB"), "memory.reserved": ("memory_reserved", "MiB"),
    "utilization.gpu": ("utilization", "%"), "utilization.memory": ("utilization_memory", "%"),
    "pci.bus_id": ("pci_bus_id", ""), "gpu_bus_id": ("pci_bus_id", ""),
    "driver_version": ("driver_version", ""),
    "temperature.gpu": ("temperature", ""), "power.draw": ("power_draw", "W"), "count": ("count", ""),
    "compute_cap": ("compute_cap", ""), "serial": ("serial", ""), "gpu_serial": ("serial", ""),
    "persistence_mode": ("persistence_mode", ""),
}
APP_FIELDS = {
    "pid": ("pid", ""), "process_name": ("process_name", ""), "name": ("process_name", ""),
    "used_memory": ("used_memory", "MiB"), "used_gpu_memory": ("used_memory", "MiB"),
    "gpu_uuid": ("gpu_uuid", ""), "gpu_name": ("gpu_name", ""), "gpu_bus_id": ("gpu_bus_id", ""),
    "gpu_serial": ("gpu_serial", ""),
}


def load() -> list[dict]:
    with open(DATA) as f:
        gpus = json.load(f)
    for gpu in gpus:
        gpu.setdefault("memory_reserved", 0)
        gpu["memory_free"] = gpu["memory_total"] - gpu["memory_used"] - gpu["memory_reserved"]
        gpu["count"] = len(gpus)
        gpu["driver_version"] = DRIVER
        gpu.setdefault("utilization_memory", 0)
    return gpus


def fmt(value: object, unit: str, units: bool) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    return f"{value} {unit}" if units and unit else str(value)


def query(records: list[dict], fields_arg: str, table: dict, fmt_arg: str | None) -> int:
    if fmt_arg is None:
        print('Must specify the output format with "--format".\nPlease run \'nvidia-smi -h\' for help.')
        return 2
    options = fmt_arg.split(",")
    if options[0] != "csv":
        print(f'"{fmt_arg}" is not a valid format.', file=sys.stderr)
        return 2
    fields = [f.strip() for f in fields_arg.split(",") if f.strip()]
    for field in fields:
        if field not in table:
            print(f'Field "{field}" is not a valid field to query.\n')
            return 2
    units = "nounits" not in options
    if "noheader" not in options:
        print(", ".join(f"{f} [{table[f][1]}]" if table[f][1] else f for f in fields))
    for record in records:
        print(", ".join(fmt(record.get(table[f][0], "[N/A]"), table[f][1], units) for f in fields))
    return 0


def summary(gpus: list[dict]) -> None:
    print(f"| NVIDIA-SMI {DRIVER}    Driver Version: {DRIVER}    CUDA Version: {CUDA} |")
    for gpu in gpus:
        print(f"| {gpu['index']:>3}  {gpu['name']:<28} | {gpu['pci_bus_id']} | "
              f"{gpu['memory_used']}MiB / {gpu['memory_total']}MiB | {gpu['utilization']}% |")
    print("| Processes:")
    for gpu in gpus:
        for proc in gpu.get("processes", []):
            print(f"|  {gpu['index']:>3}  {proc['pid']:>8}  C  {proc.get('process_name', '?'):<20} "
                  f"{proc['used_memory']}MiB |")


def main(argv: list[str]) -> int:
    value_options = {"-i": "--id", "--id": "--id", "--format": "--format", "--query-gpu": "--query-gpu",
                     "--query-compute-apps": "--query-compute-apps"}
    opts: dict[str, str | None] = {}
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name in value_options:
            opts[value_options[name]] = value if eq else next(args, "")
        else:
            opts[arg] = None
    if "--version" in opts:
        print(f"NVIDIA-SMI version  : {DRIVER}\nNVML version        : {DRIVER.rsplit('.', 1)[0]}\n"
              f"DRIVER version      : {DRIVER}\nCUDA Version        : {CUDA}")
        return 0
    gpus = load()
    if not gpus:
        print("No devices were found")
        return 6
    if opts.get("--id"):
        wanted = set(str(opts["--id"]).split(","))
        gpus = [g for g in gpus if wanted & {str(g["index"]), g["uuid"], g["pci_bus_id"]}]
        if not gpus:
            print(f"No devices were found matching the id {opts['--id']}")
            return 6
    if "-L" in opts or "--list-gpus" in opts:
        for gpu in gpus:
            print(f"GPU {gpu['index']}: {gpu['name']} (UUID: {gpu['uuid']})")
        return 0
    if "--query-gpu" in opts:
        return query(gpus, opts["--query-gpu"] or "", GPU_FIELDS, opts.get("--format"))
    if "--query-compute-apps" in opts:
        apps = [{**proc, "gpu_uuid": gpu["uuid"], "gpu_name": gpu["name"], "gpu_bus_id": gpu["pci_bus_id"],
                 "gpu_serial": gpu.get("serial", "[N/A]")}
                for gpu in gpus for proc in gpu.get("processes", [])]
        return query(apps, opts["--query-compute-apps"] or "", APP_FIELDS, opts.get("--format"))
    unknown = [o for o in opts if o not in ("--format",)]
    if unknown:
        print(f"Invalid combination of input arguments: {' '.join(unknown)}. Please run 'nvidia-smi -h' "
              "for help.")
        return 2
    summary(gpus)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
