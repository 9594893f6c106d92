"""How many requests an engine is serving now, from the engine's own figures: a replica being drained is
stopped once this reaches 0 (the gateway no longer sends it new ones).

- vLLM: `/metrics`, `vllm:num_requests_running` + `vllm:num_requests_waiting`;
- SGLang: `/metrics` (with `--enable-metrics`), `sglang:num_running_reqs` + `sglang:num_queue_reqs`;
- llama.cpp: `/slots`, the slots that are processing;
- Ollama: nothing says it (None).

Returns data, stores nothing.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Mapping

from lmstack.nodes.http import request

# backend -> the Prometheus gauges whose sum is the requests it holds (running and queued)
_GAUGES: Mapping[str, tuple[str, ...]] = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def requests_in_flight(backend: str, endpoint: str, *, bearer: str | None = None,
                       timeout_s: float = 2.0) -> int | None:
    """The requests the engine at `endpoint` is serving or has queued. 0 when it does not answer at all (a
    stopped engine serves nothing); None when it answers but does not say (no such figure, or not enabled)."""
    if backend == "llamacpp":
        return _llamacpp_slots(endpoint, bearer, timeout_s)
    gauges = _GAUGES.get(backend)
    if gauges is None:
        return None
    text = _get_text(endpoint + "/metrics", bearer, timeout_s)
    if text is None:
        return 0
    return prometheus_sum(text, gauges)


def prometheus_sum(text: str, names: tuple[str, ...]) -> int | None:
    """The sum of every sample of the gauges `names` in a Prometheus text exposition; None if none is there."""
    total = 0.0
    found = False
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) not in names:
            continue
        try:
            total += float(match.group(3))
        except ValueError:
            continue
        found = True
    return round(total) if found else None


def _llamacpp_slots(endpoint: str, bearer: str | None, timeout_s: float) -> int | None:
    answer = request(endpoint + "/slots", timeout_s=timeout_s, bearer=bearer)
    if answer.status is None:
        return 0
    if answer.status != 200 or not isinstance(answer.payload, list):
        return None  # started with --no-slots, or an older server
    return sum(1 for slot in answer.payload if isinstance(slot, dict) and slot.get("is_processing"))


def _get_text(url: str, bearer: str | None, timeout_s: float) -> str | None:
    """The body of GET `url` as text; "" for an error status; None when nothing answered."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url}")
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    call = urllib.request.Request(url, headers=headers)  # noqa: S310 - http(s) only, checked above
    try:
        with urllib.request.urlopen(call, timeout=timeout_s) as answer:  # noqa: S310
            return bytes(answer.read(1 << 22)).decode(errors="replace")
    except urllib.error.HTTPError:
        return ""
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError):
        return None
