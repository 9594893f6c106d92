"""Plain HTTP to a replica's engine (readiness probes, Ollama's model pull): returns data, stores nothing."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HttpAnswer:
    status: int | None  # None: no HTTP answer at all (connection refused, timeout)
    payload: Any = None  # parsed JSON, or None
    error: str | None = None


def request(url: str, *, method: str = "GET", body: Any = None, timeout_s: float = 3.0,
            bearer: str | None = None) -> HttpAnswer:
    """`bearer`: the engine's API key, sent as `Authorization: Bearer` (never logged)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    call = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - http(s) only
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    try:
        with urllib.request.urlopen(call, timeout=timeout_s) as answer:  # noqa: S310
            return HttpAnswer(answer.status, _json(answer.read()))
    except urllib.error.HTTPError as exc:
        return HttpAnswer(exc.code, _json(exc.read()), f"HTTP {exc.code}")
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return HttpAnswer(None, None, str(reason))


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
