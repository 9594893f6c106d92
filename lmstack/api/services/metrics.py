"""Prometheus metrics: what the gateway counts as requests pass, and the fleet read from the database at
scrape time.

Each `Metrics()` has its own registry (two apps in one process, as in tests, do not share counters). The
gateway calls `answered` (through the usage recorder, once per request), `upstream_failed` and
`usage_dropped`; every method is cheap and thread-safe. `exposition()` renders the text format; it
queries the database, so it is called off the event loop. With a `View` limited to some models (an API key's
allowlist) only the series of those models and their deployments are shown.

Beside the Prometheus series, `Metrics.traffic` keeps the last 15 minutes per model in 10-second buckets
(requests, errors, tokens, time to first token) for the dashboard's charts (GET /api/traffic): usage in the
database is rolled up per hour, too coarse for "what is happening now". It lives in memory: in the server
process, or in the supervisor of several (api/hub), which all of them report to; it starts empty when the
server starts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from lmstack import __version__
from lmstack.api import schemas
from lmstack.api.services.status import EVERYTHING, View, fleet_counts, visible_deployments
from lmstack.state import Database
from lmstack.state.models import ReplicaStatus

log = logging.getLogger(__name__)

# The classic text format (0.0.4): every Prometheus version and most other scrapers read it.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Whole requests: from tens of milliseconds (embeddings) to minutes (long generations).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
REPLICA_STATES: tuple[str, ...] = get_args(ReplicaStatus)


class MetricsRecorder(Protocol):
    """What the gateway records, and /metrics and /api/traffic read: `Metrics` in one process, or
    `api.hub.client.SharedMetrics`, which sends each record to the one `Metrics` the supervisor of several
    processes keeps (api/hub)."""

    def answered(self, model: str, status: int | str, seconds: float, ttft_s: float | None, prompt: int,
                 completion: int) -> None: ...
    def upstream_failed(self, model: str, reason: str) -> None: ...
    def usage_dropped(self, n: int = 1) -> None: ...
    def log_stream_opened(self) -> None: ...
    async def render(self, *, database: Database, view: View) -> bytes:
        """The Prometheus text (see Metrics.exposition)."""
    async def traffic_snapshot(self, view: View) -> schemas.Traffic:
        """The dashboard's last minutes (see Traffic.snapshot)."""


class Metrics:
    """The process's metrics. `model` labels should be served names of known models (or "unknown"): a
    client's arbitrary model string as a label would grow the series without bound."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "lmstack_requests", "Gateway requests answered, by model and HTTP status.", ["model", "status"],
            registry=self.registry)
        self._latency = Histogram(
            "lmstack_request_duration_seconds", "Gateway request duration, to the last byte.", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self._ttft = Histogram(
            "lmstack_time_to_first_token_seconds", "Time from the request to the first token streamed back.",
            ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self._tokens = Counter(
            "lmstack_tokens", "Tokens processed, by model and kind (prompt or completion).", ["model", "kind"],
            registry=self.registry)
        self._upstream_failures = Counter(
            "lmstack_upstream_failures", "Requests to a replica that failed (the gateway may have retried "
            "another), by model and reason.", ["model", "reason"], registry=self.registry)
        self._usage_dropped = Counter(
            "lmstack_usage_records_dropped", "Usage records dropped because the buffer was full while the "
            "database was unreachable.", registry=self.registry)
        self._log_streams = Counter(
            "lmstack_log_streams", "Live log streams opened over the WebSocket.", registry=self.registry)
        self._requests_by_status: dict[tuple[str, int | str], Counter] = {}
        self._by_model: dict[str, _ModelSeries] = {}
        self.traffic = Traffic()

    # -- for the gateway ---------------------------------------------------------------------------------------

    def answered(self, model: str, status: int | str, seconds: float, ttft_s: float | None, prompt: int,
                 completion: int) -> None:
        """One answered request and its tokens (the usage recorder calls this once per request)."""
        self.observe_request(model, status, seconds, ttft_s)
        if prompt or completion:
            self.add_tokens(model, prompt, completion)

    def observe_request(self, model: str, status: int | str, seconds: float, ttft_s: float | None = None) -> None:
        """One answered request: its status, how long it took and, for generations, the time to first token."""
        requests = self._requests_by_status.get((model, status))
        if requests is None:  # labels() costs more than the update itself: looked up once per series
            requests = self._requests_by_status[(model, status)] = self._requests.labels(model=model,
                                                                                        status=str(status))
        requests.inc()
        series = self._model_series(model)
        series.latency.observe(max(seconds, 0.0))
        if ttft_s is not None:
            series.ttft.observe(max(ttft_s, 0.0))
        # Failed as the usage rows count it (UsageRecord.failed): any answer of 400 and above.
        self.traffic.request(model, failed=not isinstance(status, int) or status >= 400, ttft_s=ttft_s)

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        series = self._model_series(model)
        if prompt > 0:
            series.prompt.inc(prompt)
        if completion > 0:
            series.completion.inc(completion)
        self.traffic.tokens(model, prompt, completion)

    def _model_series(self, model: str) -> _ModelSeries:
        series = self._by_model.get(model)
        if series is None:
            series = self._by_model[model] = _ModelSeries(
                self._latency.labels(model=model), self._ttft.labels(model=model),
                self._tokens.labels(model=model, kind="prompt"), self._tokens.labels(model=model, kind="completion"))
        return series

    def upstream_failed(self, model: str, reason: str) -> None:
        """A call to a replica failed (connect, timeout, 5xx ...); `reason` is one of a few fixed words."""
        self._upstream_failures.labels(model=model, reason=reason).inc()

    def usage_dropped(self, n: int = 1) -> None:
        if n > 0:
            self._usage_dropped.inc(n)

    def log_stream_opened(self) -> None:
        self._log_streams.inc()

    # -- for /metrics and /api/traffic ------------------------------------------------------------------------

    async def render(self, *, database: Database, view: View) -> bytes:
        return await asyncio.to_thread(self.exposition, database=database, view=view)

    async def traffic_snapshot(self, view: View) -> schemas.Traffic:
        # In memory, a few hundred numbers per model: no reason to take a thread.
        return self.traffic.snapshot(view)

    def exposition(self, *, database: Database | None, view: View = EVERYTHING) -> bytes:
        """The Prometheus text: this process's metrics and, read from `database` now, replicas by
        deployment and state; only `view`'s models. Blocking (a query): run it in a thread."""
        scrape = _Scrape(self.registry, database)
        if view.models is None:
            return generate_latest(scrape)
        deployments: set[str] = set()
        if database is not None:
            try:
                with database.session() as session:
                    deployments = visible_deployments(session, view) or set()
            except SQLAlchemyError:
                pass  # no deployment series then; the scrape itself reports the database down
        return generate_latest(_Only(scrape, models=view.models, deployments=deployments))


@dataclass(frozen=True, slots=True)
class _ModelSeries:
    """One model's labelled series, looked up once."""

    latency: Histogram
    ttft: Histogram
    prompt: Counter
    completion: Counter


class _Only:
    """A scrape with only the samples of some models (label `model`) and deployments (label `deployment`)."""

    def __init__(self, scrape: _Scrape, *, models: frozenset[str], deployments: set[str]) -> None:
        self.scrape = scrape
        self.models = models
        self.deployments = deployments

    def collect(self) -> Iterator[Metric]:
        for metric in self.scrape.collect():  # each collect() builds new Metric objects: ours to trim
            metric.samples = [sample for sample in metric.samples if self._keeps(sample.labels)]
            yield metric

    def _keeps(self, labels: dict[str, str]) -> bool:
        model, deployment = labels.get("model"), labels.get("deployment")
        return (model is None or model in self.models) and (deployment is None or deployment in self.deployments)


class _Scrape:
    """One scrape: the registry's metrics, then the fleet from the database (a collector made per scrape, so
    the query runs only when someone asks)."""

    def __init__(self, registry: CollectorRegistry, database: Database | None) -> None:
        self.registry = registry
        self.database = database

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        info = GaugeMetricFamily("lmstack_build_info", "The lmstack version serving.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if self.database is None:
            return
        up = GaugeMetricFamily("lmstack_database_up", "Whether the state database answered this scrape.")
        try:
            with self.database.session() as session:
                counts = fleet_counts(session=session)
        except SQLAlchemyError as exc:
            log.warning("metrics: the database did not answer (%s); replica gauges left out", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        replicas = GaugeMetricFamily("lmstack_replicas", "Replicas by deployment and state (from the database).",
                                     labels=["deployment", "state"])
        # Every state of every deployment, zeros included, so `== 0` alerts see a series.
        deployments = sorted(set(counts.wanted) | {deployment for deployment, _ in counts.replicas})
        states = sorted(set(REPLICA_STATES) | {state for _, state in counts.replicas})
        for deployment in deployments:
            for state in states:
                replicas.add_metric([deployment, state], counts.replicas.get((deployment, state), 0))
        yield replicas
        wanted = GaugeMetricFamily("lmstack_deployment_replicas_wanted", "Replicas each deployment's spec asks for.",
                                   labels=["deployment"])
        for deployment, count in sorted(counts.wanted.items()):
            wanted.add_metric([deployment], count)
        yield wanted


# -- the last minutes, for the dashboard ------------------------------------------------------------------------

BUCKET_S = 10
WINDOW_S = 15 * 60
MAX_MODELS = 1000  # models are served names the registry knows; this only bounds a fleet that keeps renaming

# A bucket: [its number (unix time // bucket_s), requests, errors, prompt tokens, completion tokens,
# TTFT sum in seconds, requests with a TTFT]. A plain list: the cheapest thing to find and bump per request.
_NUMBER, _REQUESTS, _ERRORS, _PROMPT, _COMPLETION, _TTFT_SUM, _TTFT_COUNT = range(7)


class Traffic:
    """Requests, errors, tokens and time to first token per model over the last `window_s` seconds, in buckets
    of `bucket_s` seconds. In memory (nothing is kept across restarts).

    Each model has a ring of window_s / bucket_s buckets, made on its first request; a bucket is reused (zeroed)
    when its time comes round again, so memory stays bounded: at most `max_models` rings of 90 small lists.
    A model with no request for a whole window is forgotten when the series is read or when a new model needs
    the room. One lock around a few list operations per call: cheap beside the request it counts, and safe
    from any thread. `clock`: unix time (tests pass their own).
    """

    def __init__(self, *, bucket_s: int = BUCKET_S, window_s: int = WINDOW_S, max_models: int = MAX_MODELS,
                 clock: Callable[[], float] = time.time) -> None:
        if bucket_s <= 0 or window_s < bucket_s:
            raise ValueError("bucket_s must be positive and window_s at least one bucket")
        self.bucket_s = bucket_s
        self.size = window_s // bucket_s
        self.max_models = max_models
        self.clock = clock
        self._lock = threading.Lock()
        self._rings: dict[str, list[list[float] | None]] = {}

    def request(self, model: str, *, failed: bool, ttft_s: float | None = None) -> None:
        """One answered request (counted in the bucket of the moment it was answered)."""
        with self._lock:
            bucket = self._bucket(model)
            if bucket is None:
                return
            bucket[_REQUESTS] += 1
            if failed:
                bucket[_ERRORS] += 1
            if ttft_s is not None:
                bucket[_TTFT_SUM] += max(ttft_s, 0.0)
                bucket[_TTFT_COUNT] += 1

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt <= 0 and completion <= 0:
            return
        with self._lock:
            bucket = self._bucket(model)
            if bucket is None:
                return
            bucket[_PROMPT] += max(prompt, 0)
            bucket[_COMPLETION] += max(completion, 0)

    def _bucket(self, model: str) -> list[float] | None:
        """The current bucket of `model` (zeroed if it held an older one); None when there is no room for
        another model. Called with the lock held."""
        number = int(self.clock() // self.bucket_s)
        ring = self._rings.get(model)
        if ring is None:
            if len(self._rings) >= self.max_models:
                self._forget_idle(number)
                if len(self._rings) >= self.max_models:
                    return None
            ring = self._rings[model] = [None] * self.size
        slot = number % self.size
        bucket = ring[slot]
        if bucket is None:
            bucket = ring[slot] = [number, 0, 0, 0, 0, 0.0, 0]
        elif bucket[_NUMBER] != number:
            bucket[:] = (number, 0, 0, 0, 0, 0.0, 0)
        return bucket

    def _forget_idle(self, number: int) -> None:
        """Drop the models with no bucket inside the window that ends at bucket `number` (lock held)."""
        oldest = number - self.size + 1
        for model in [m for m, ring in self._rings.items()
                      if all(b is None or b[_NUMBER] < oldest for b in ring)]:
            del self._rings[model]

    def snapshot(self, view: View = EVERYTHING) -> schemas.Traffic:
        """The window as columns, oldest bucket first, for the models `view` sees that had requests in it (by
        name). The last bucket is the current one, still filling (`now` says how far it is)."""
        now = self.clock()
        number = int(now // self.bucket_s)
        oldest = number - self.size + 1
        with self._lock:
            self._forget_idle(number)
            copied = {model: [list(b) for b in ring if b is not None and b[_NUMBER] >= oldest]
                      for model, ring in self._rings.items() if view.sees(model)}
        models = []
        for model in sorted(copied):
            columns: list[list[int]] = [[0] * self.size for _ in range(4)]
            ttft: list[float | None] = [None] * self.size
            for b in copied[model]:
                at = int(b[_NUMBER]) - oldest
                for column, field in zip(columns, (_REQUESTS, _ERRORS, _PROMPT, _COMPLETION), strict=True):
                    column[at] = int(b[field])
                if b[_TTFT_COUNT]:
                    ttft[at] = round(1000 * b[_TTFT_SUM] / b[_TTFT_COUNT], 1)
            requests, errors, prompt, completion = columns
            models.append(schemas.TrafficSeries(model=model, requests=requests, errors=errors, prompt_tokens=prompt,
                                                completion_tokens=completion, ttft_ms=ttft))
        return schemas.Traffic(bucket_seconds=self.bucket_s, window_seconds=self.size * self.bucket_s,
                               times=[(oldest + i) * self.bucket_s for i in range(self.size)],
                               now=math.floor(now * 1000) / 1000, models=models)
