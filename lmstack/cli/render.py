"""How a plan reads in a terminal: one line per change, the reason beside it, field diffs and mounts below,
and the Docker endpoint of every worker it may touch; what the observe phase saw; `lmstack status`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape

from lmstack.reconcile.apply import Survey
from lmstack.reconcile.model import Action, ActionKind, Plan
from lmstack.reconcile.status import FleetStatus

_STYLE = {
    ActionKind.CREATE: ("+", "green"),
    ActionKind.RECREATE: ("~", "yellow"),
    ActionKind.UPDATE: ("^", "cyan"),
    ActionKind.DELETE: ("-", "red"),
    ActionKind.NOOP: (" ", "dim"),
}


@dataclass(frozen=True)
class Reach:
    """What a plan reaches besides its containers' specs: shown with it, so a reviewer sees where a commit goes."""

    endpoints: Mapping[str, str]  # worker -> the Docker endpoint apply uses there
    model_caches: Mapping[str, str]  # worker -> its model cache (host path)
    mounts: Mapping[tuple[str, int], Sequence[tuple[str, str]]]  # (deployment, replica) -> (host, container)


def render_plan(console: Console, plan: Plan, *, header: str, show_noop: bool = False,
                reach: Reach | None = None) -> None:
    console.print(header, highlight=False)
    console.print()
    if reach is not None and reach.endpoints:
        console.print("Docker endpoints:", highlight=False)
        name_width = max(len(name) for name in reach.endpoints)
        for name, url in sorted(reach.endpoints.items()):
            console.print(f"  {escape(name.ljust(name_width))}  {escape(url)}", highlight=False)
        console.print()
    shown = [a for a in plan.actions if show_noop or a.kind is not ActionKind.NOOP or "cannot" in a.reason]
    # What a commit removes comes first: pruning deletes whole deployments, and the reader should not miss it.
    shown.sort(key=lambda a: not a.reason.startswith("deployment removed from manifests"))
    width = max((len(a.replica_name) for a in shown), default=0)
    mounts = reach.mounts if reach is not None else {}
    for action in shown:
        _render_action(console, action, width)
        for host_path, container_path in mounts.get((action.deployment, action.replica), ()):
            console.print(f"      [dim]mount[/] {escape(host_path)} -> {escape(container_path)}", highlight=False)
    for item in plan.unplaceable:
        name = f"{item.deployment}/{item.replica}"
        console.print(f"  [bold magenta]! unplaceable[/] {escape(name.ljust(width))}  {escape(item.reason)}",
                      highlight=False)
    if shown or plan.unplaceable:
        console.print()
    for note in plan.notes:
        console.print(f"[yellow]Note:[/] {escape(note)}", highlight=False)
    counts = plan.counts()
    summary = (f"{counts[ActionKind.CREATE]} to create, {counts[ActionKind.RECREATE]} to recreate, "
               f"{counts[ActionKind.UPDATE]} to update in place, {counts[ActionKind.DELETE]} to delete, "
               f"{counts[ActionKind.NOOP]} unchanged")
    if plan.unplaceable:
        summary += f", {len(plan.unplaceable)} unplaceable"
    if not plan.has_changes and not plan.unplaceable:
        console.print(f"[bold green]No changes.[/] {summary}.", highlight=False)
    else:
        console.print(f"[bold]Plan:[/] {summary}.", highlight=False)


def render_observation(console: Console, survey: Survey) -> None:
    """What the observe phase saw besides the plan: workers not Ready, workers whose containers could not be
    listed, containers found gone or stopped, orphans; or that nothing was observed."""
    for name, reason in sorted(survey.not_ready.items()):
        console.print(f"[yellow]Worker {escape(name)} is not Ready:[/] {escape(reason)}", highlight=False)
    if not survey.live.observed_live:
        console.print("[yellow]Containers not observed:[/] the plan trusts the recorded status of every replica.",
                      highlight=False)
    for name, reason in sorted(survey.live.unreachable.items()):
        console.print(f"[yellow]Containers on {escape(name)} could not be listed:[/] {escape(reason)} "
                      "(its replicas are planned as recorded)", highlight=False)
    for lost in survey.live.lost:
        console.print(f"[red]{escape(lost.deployment)}/{lost.ordinal} is {lost.status}:[/] {escape(lost.message)}",
                      highlight=False)


def render_orphans(console: Console, survey: Survey) -> None:
    for orphan in survey.live.orphans:
        console.print(f"  [red]- orphan[/]   {escape(orphan.name)} on {escape(orphan.worker)}  "
                      f"[dim]{escape(orphan.reason)}[/]", highlight=False)


_STATE_STYLE = {"Synced": "green", "OutOfSync": "yellow", "Progressing": "cyan", "Degraded": "red",
                "Unknown": "dim"}


def render_status(console: Console, status: FleetStatus) -> None:
    """`lmstack status`: the sync state of the fleet, then per deployment its state, revisions and replicas."""
    style = _STATE_STYLE.get(status.sync, "")
    console.print(f"Sync: [{style}]{status.sync}[/]  {escape(status.sync_message)}", highlight=False)
    if not status.deployments:
        console.print("No deployments recorded.", highlight=False)
    for deployment in status.deployments:
        style = _STATE_STYLE.get(deployment.state, "")
        console.print()
        console.print(f"[bold]{escape(deployment.name)}[/]  [{style}]{deployment.state}[/]  "
                      f"{deployment.ready}/{deployment.wanted} ready  [dim]{escape(deployment.reason)}[/]",
                      highlight=False)
        console.print(f"  last applied {_sha(deployment.last_applied_revision)}, last attempted "
                      f"{_sha(deployment.last_attempted_revision)}", highlight=False)
        for replica in deployment.replicas:
            message = f"  [dim]{escape(replica.message)}[/]" if replica.message else ""
            console.print(f"  {escape(replica.name)}  {escape(replica.worker)}  {escape(replica.status)}{message}",
                          highlight=False)


def _sha(revision: str | None) -> str:
    return revision[:12] if revision else "none"


def _render_action(console: Console, action: Action, width: int) -> None:
    sign, colour = _STYLE[action.kind]
    where = _where(action)
    console.print(
        f"  [{colour}]{sign} {action.kind.value:<8}[/] {escape(action.replica_name.ljust(width))}  "
        f"{escape(where)}  [dim]{escape(action.reason)}[/]",
        highlight=False,
    )
    for change in action.changes:
        console.print(f"      [dim]{escape(change.path)}:[/] {escape(_short(change.old))} -> "
                      f"{escape(_short(change.new))}", highlight=False)


def _where(action: Action) -> str:
    if action.kind is ActionKind.DELETE:
        return f"from {action.previous}" if action.previous else ""
    if action.surge is not None:
        return f"as {action.deployment}/{action.surge} on {action.placement}, then drained"
    if action.kind is ActionKind.RECREATE and action.previous and action.placement \
            and action.previous.worker != action.placement.worker:
        return f"on {action.placement} (from {action.previous.worker})"
    return f"on {action.placement}" if action.placement else ""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- `lmstack plan --show-commands` ------------------------------------------------------------------
# Imported here, beside the one function that uses them.
from collections.abc import Callable  # noqa: E402

from lmstack.backends import ReplicaContext, backend_for, effective_spec, spec_hash  # noqa: E402
from lmstack.backends.container import ContainerSpec  # noqa: E402
from lmstack.manifests.loader import DesiredState  # noqa: E402
from lmstack.manifests.schema import WorkerSpec  # noqa: E402
from lmstack.reconcile.access import WorkerAccess  # noqa: E402


def render_commands(plan: Plan, desired: DesiredState, *,
                    model_cache: Callable[[str], str] | None = None) -> list[tuple[str, str]]:
    """(replica name, the equivalent `docker run` line) for each replica the plan creates or recreates.

    `model_cache(worker)` gives the worker's model cache path; by default its Worker manifest's
    `modelCache`. The port shown is the backend's default: at apply time the executor picks a free
    port on the worker (the default when it is free). Environment values are never shown, nor resolved:
    the line names the variables only (their values may be secrets).
    """
    return [(action.replica_name, container.docker_run())
            for action, container in _planned_containers(plan, desired, model_cache)]


def plan_reach(plan: Plan, desired: DesiredState, workers: Mapping[str, WorkerAccess]) -> Reach:
    """Each worker's Docker endpoint and model cache as apply uses them (`workers`, from worker_access), and
    the mounts of each container the plan creates or recreates."""
    caches = {name: access.model_cache for name, access in workers.items()}

    def model_cache(worker: str) -> str:
        if worker in caches:
            return caches[worker]
        declared = desired.workers.get(worker)
        return declared.spec.model_cache if declared else str(WorkerSpec.model_fields["model_cache"].default)

    mounts = {(action.deployment, action.replica): tuple(sorted(container.volumes.items()))
              for action, container in _planned_containers(plan, desired, model_cache)}
    return Reach(endpoints={name: access.docker_url for name, access in workers.items()}, model_caches=caches,
                 mounts=mounts)


def plan_document(plan: Plan, reach: Reach) -> dict[str, Any]:
    """The plan as JSON (`lmstack plan --json`), with each worker's Docker endpoint and model cache and each
    action's mounts."""
    document = plan.to_json()
    for entry in document["actions"]:
        entry["mounts"] = [{"host": host, "container": container}
                           for host, container in reach.mounts.get((entry["deployment"], entry["replica"]), ())]
    document["workers"] = [{"name": name, "dockerHost": url, "modelCache": reach.model_caches.get(name)}
                           for name, url in sorted(reach.endpoints.items())]
    return document


def _planned_containers(plan: Plan, desired: DesiredState,
                        model_cache: Callable[[str], str] | None) -> list[tuple[Action, ContainerSpec]]:
    found: list[tuple[Action, ContainerSpec]] = []
    for action in plan.actions:
        if action.kind not in (ActionKind.CREATE, ActionKind.RECREATE) or action.placement is None:
            continue
        deployment = desired.deployments[action.deployment]
        spec = effective_spec(deployment.name, deployment.spec)
        backend = backend_for(spec.backend)
        worker = action.placement.worker
        if model_cache is not None:
            cache = model_cache(worker)
        else:
            declared = desired.workers.get(worker)
            cache = declared.spec.model_cache if declared else WorkerSpec.model_fields["model_cache"].default
        replica = ReplicaContext(
            deployment=deployment.name, ordinal=action.new_replica, served_name=spec.served_name,
            gpus=action.placement.gpus, port=backend.default_port, model_cache=str(cache), revision=None,
            spec_hash=action.spec_hash or spec_hash(spec),
        )
        placeholders = dict.fromkeys(spec.env, "")  # names only: nothing is resolved
        found.append((action, backend.container(spec, replica, placeholders)))
    return found
