"""How a node preparation reads in a terminal: one row per worker, then the problems in full."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmstack.reconcile.prepare import ImageStatus, ModelCheck, ModelStatus, PrepareReport, WorkerPrepared

OK = "[green]✓[/]"
NO = "[red]✗[/]"


def render_prepare(console: Console, report: PrepareReport, *, header: str) -> None:
    console.print(header, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    with_models = any(worker.models for worker in report.workers)
    columns = ("WORKER", "HOST", "STATUS", "DOCKER", "NVIDIA RUNTIME", "MODEL CACHE", "IMAGES")
    for column in (*columns, "MODELS") if with_models else columns:
        table.add_column(column, overflow="fold")
    for worker in report.workers:
        cells = [escape(worker.worker), escape(worker.host), _status(worker), docker_cell(worker),
                 nvidia_cell(worker), cache_cell(worker), images_cell(worker)]
        table.add_row(*cells, *([models_cell(worker)] if with_models else []))
    console.print(table)
    downloads = [(worker.worker, model) for worker in report.workers for model in worker.models
                 if model.status == "downloaded"]
    if downloads:
        console.print("Downloaded:")
        for name, model in downloads:
            console.print(f"  {escape(name)}: {escape(model.source)} {download_figures(model)}", highlight=False)
    failed = report.failed
    if failed:
        console.print("Problems:")
        for worker in failed:
            for problem in worker.problems:
                console.print(f"  {escape(worker.worker)}: {escape(problem)}", highlight=False)
    changes = [f"{worker.worker}: {', '.join(worker.changes)}" for worker in report.changed]
    if changes:
        console.print("Changed:")
        for line in changes:
            console.print(f"  {escape(line)}", highlight=False)
    total = len(report.workers)
    summary = (f"{total - len(failed)} of {total} workers prepared, {len(report.changed)} changed; "
               f"in {report.elapsed_s:.1f} s.")
    if not report.install and any(w.docker is not None and not w.docker.ok for w in failed):
        summary += " Run with --install to install Docker (docker.io) and start it."
    console.print(summary, highlight=False)


def _status(worker: WorkerPrepared) -> str:
    if not worker.ok:
        kind = "failed" if worker.error_kind in (None, "not_ready") else worker.error_kind
        return f"[red]{escape(kind or 'failed')}[/]"
    return "[yellow]changed[/]" if worker.changed else "[green]ok[/]"


def docker_cell(worker: WorkerPrepared) -> str:
    docker = worker.docker
    if docker is None:
        return "-"
    if not docker.ok:
        missing = "not installed" in (docker.error or "") or "cannot install" in (docker.error or "")
        return f"{NO} missing" if missing else f"{NO} not answering"
    note = " (installed)" if docker.installed else " (started)" if docker.started else ""
    return f"{OK} {escape(docker.version or '')}{note}"


def nvidia_cell(worker: WorkerPrepared) -> str:
    nvidia = worker.nvidia
    if nvidia is None:
        return "-"
    if not nvidia.required:
        return "not needed" + (" (present)" if nvidia.ok else "")
    if nvidia.ok:
        note = " (installed)" if nvidia.installed else " (configured)" if nvidia.configured else ""
        return f"{OK}{note}"
    return f"{NO} no toolkit" if not nvidia.toolkit else f"{NO} not in Docker"


def cache_cell(worker: WorkerPrepared) -> str:
    cache = worker.cache
    if cache is None:
        return "-"
    mark = OK if cache.ok else NO
    note = " created" if cache.created else ""
    return f"{mark} {escape(cache.path)}{note}"


def images_cell(worker: WorkerPrepared) -> str:
    if worker.docker is None:
        return "-"
    if not worker.images:
        return "none needed"
    parts = []
    styles: tuple[tuple[ImageStatus, str], ...] = (
        ("present", "green"), ("pulled", "yellow"), ("failed", "red"), ("skipped", "red"))
    for status, style in styles:
        count = worker.count(status)
        if count:
            parts.append(f"[{style}]{count} {status}[/]")
    return ", ".join(parts)


def models_cell(worker: WorkerPrepared) -> str:
    if worker.cache is None:
        return "-"
    if not worker.models:
        return "none needed"
    styles: tuple[tuple[ModelStatus, str], ...] = (
        ("present", "green"), ("downloaded", "yellow"), ("failed", "red"), ("skipped", "red"))
    return ", ".join(f"[{style}]{count} {status}[/]" for status, style in styles
                     if (count := sum(1 for model in worker.models if model.status == status)))


def download_figures(model: ModelCheck) -> str:
    size, seconds, resumed = model.bytes or 0, model.seconds or 0.0, model.resumed_from or 0
    rate = f", {size / seconds / 1e6:.1f} MB/s" if seconds > 0 else ""
    again = f", resumed at {resumed / 1e6:.1f} MB" if resumed else ""
    return f"({size / 1e6:.1f} MB in {seconds:.1f} s{rate}{again}{_checked(model)})"


def _checked(model: ModelCheck) -> str:
    return {"pinned": ", sha256 as pinned", "announced": ", sha256 as the server announced"}.get(
        model.sha256_checked or "", ", sha256 not checked: pin it with @sha256:...")
