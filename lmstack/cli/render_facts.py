"""How gathered node facts read in a terminal: one row per worker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmstack.manifests.quantity import format_quantity
from lmstack.reconcile.facts import FactsReport, WorkerFacts


def render_facts(console: Console, report: FactsReport, *, header: str) -> None:
    console.print(header, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in ("WORKER", "HOST", "STATUS", "GPUS", "DOCKER", "NVIDIA RUNTIME", "CPUS", "MEMORY",
                   "DISK FREE"):
        table.add_column(column, overflow="fold")
    for worker in report.workers:
        facts = worker.facts or {}
        stale = not worker.ready and worker.facts is not None
        cells = [gpus_summary(facts), docker_summary(facts), _yes_no(facts.get("nvidia_runtime")),
                 _plain(facts.get("cpus")), _bytes(facts.get("memory_total")), disk_summary(facts)]
        if worker.facts is None:
            cells = ["-"] * len(cells)
        style = "dim" if stale else ""  # old facts, kept for display
        table.add_row(escape(worker.worker), escape(worker.host), _status(worker),
                      *(f"[{style}]{escape(cell)}[/]" if style else escape(cell) for cell in cells))
    console.print(table)
    failed = len(report.failed)
    total = len(report.workers)
    summary = f"{total - failed} of {total} workers Ready; gathered in {report.elapsed_s:.1f} s."
    if failed:
        summary += " Facts of NotReady workers are from their last successful gathering (dim)."
    console.print(summary, highlight=False)


def _status(worker: WorkerFacts) -> str:
    if worker.ready:
        return "[green]Ready[/]"
    return f"[red]NotReady[/]: {escape(worker.error or '')}"


def gpus_summary(facts: Mapping[str, Any]) -> str:
    """`2× H100 80GB HBM3 79.6Gi (1 busy)`: busy GPUs hold memory of processes lmstack did not start."""
    gpus = facts.get("gpus") or []
    if not gpus:
        # The reason of the last source tried (nvidia-smi): NVML's is in the JSON output.
        reason = str(facts.get("gpu_error") or "").split("; ")[-1]
        return f"none ({reason})" if reason else "none"
    kinds = Counter((_short_name(gpu.get("name", "")), int(gpu.get("memory_total") or 0)) for gpu in gpus)
    parts = [f"{count}× {name} {format_quantity(memory)}".replace("  ", " ")
             for (name, memory), count in sorted(kinds.items())]
    busy = sum(1 for gpu in gpus if int(gpu.get("memory_unmanaged") or 0) > 0)
    return ", ".join(parts) + (f" ({busy} busy)" if busy else "")


def docker_summary(facts: Mapping[str, Any]) -> str:
    version = facts.get("docker_version")
    if version:
        return str(version)
    reason = str(facts.get("docker_error") or "")
    if reason.startswith("Cannot connect to the Docker daemon"):
        reason = "the daemon is not running or not reachable"  # the socket path is in the JSON output
    return f"none ({reason})" if reason else "none"


def disk_summary(facts: Mapping[str, Any]) -> str:
    error = facts.get("disk_error")
    return f"{_bytes(facts.get('disk_free'))} ({error})" if error else _bytes(facts.get("disk_free"))


def _short_name(name: str) -> str:
    return name.removeprefix("NVIDIA ").strip() or "GPU"


def _yes_no(value: object) -> str:
    return "yes" if value else "no"


def _plain(value: object) -> str:
    return "-" if value is None else str(value)


def _bytes(value: object) -> str:
    return format_quantity(value) if isinstance(value, int) else "-"
