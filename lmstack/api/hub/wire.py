"""What goes over the hub's socket: one JSON array per line, and the few typed values that JSON lacks (times,
API keys, replicas), turned into JSON and back in one place."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Any

from lmstack.api.gateway.registry import Row, Snapshot
from lmstack.api.services.keys import KeyInfo

LINE_LIMIT = 64 * 1024 * 1024  # the longest line either side reads (a /metrics answer for a large fleet)


def encode(message: list[Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def stamp(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def unstamp(at: str | None) -> datetime | None:
    return datetime.fromisoformat(at) if at is not None else None


def key_out(info: KeyInfo) -> dict[str, Any]:
    found = asdict(info)
    found.update(models=list(info.models) if info.models is not None else None, scopes=sorted(info.scopes),
                 expires_at=stamp(info.expires_at), tokens_read_at=stamp(info.tokens_read_at))
    return found


def key_in(found: dict[str, Any]) -> KeyInfo:
    return KeyInfo(**{**found, "models": tuple(found["models"]) if found["models"] is not None else None,
                      "scopes": frozenset(found["scopes"]), "expires_at": unstamp(found["expires_at"]),
                      "tokens_read_at": unstamp(found["tokens_read_at"])})


def replicas_out(snapshot: Snapshot) -> dict[str, Any]:
    return {"replicas": [{**asdict(row), "created_at": stamp(row.created_at)} for row in snapshot.replicas],
            "served_names": sorted(snapshot.served_names)}


def replicas_in(found: dict[str, Any]) -> Snapshot:
    return Snapshot(replicas=[Row(**{**row, "created_at": unstamp(row["created_at"])}) for row in found["replicas"]],
                    served_names=set(found["served_names"]))
