"""What every backend declares as data: its pinned image, port, and which spec fields need a restart."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    default_image: str
    default_port: int
    # Effective-spec paths (camelCase, dotted) whose change needs a new container.
    restart_fields: tuple[str, ...]
    # Paths the running engine can take without a restart (e.g. Ollama pulls another model).
    in_place_fields: tuple[str, ...] = ()

    def classify(self, path: str) -> str:
        """'restart', 'in-place' or 'controller' (replicas, placement, health: no replica is touched)."""
        if _matches(path, self.restart_fields):
            return "restart"
        if _matches(path, self.in_place_fields):
            return "in-place"
        return "controller"


def _matches(path: str, fields: tuple[str, ...]) -> bool:
    return any(path == field or path.startswith((field + ".", field + "[")) for field in fields)
