"""How a plan reads in a terminal: one line per change, the reason beside it, field diffs below."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from lmstack.reconcile.model import Action, ActionKind, Plan

_STYLE = {
    ActionKind.CREATE: ("+", "green"),
    ActionKind.RECREATE: ("~", "yellow"),
    ActionKind.UPDATE: ("^", "cyan"),
    ActionKind.DELETE: ("-", "red"),
    ActionKind.NOOP: (" ", "dim"),
}


def render_plan(console: Console, plan: Plan, *, header: str, show_noop: bool = False) -> None:
    console.print(header, highlight=False)
    console.print()
    shown = [a for a in plan.actions if show_noop or a.kind is not ActionKind.NOOP or "cannot" in a.reason]
    width = max((len(a.replica_name) for a in shown), default=0)
    for action in shown:
        _render_action(console, action, width)
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
    if action.kind is ActionKind.RECREATE and action.previous and action.placement \
            and action.previous.worker != action.placement.worker:
        return f"on {action.placement} (from {action.previous.worker})"
    return f"on {action.placement}" if action.placement else ""


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
