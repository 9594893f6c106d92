"""Prometheus metrics: what the gateway counts as requests pass, and the fleet read from the database at
scrape time.

Each `Metrics()` has its own registry (two apps in one process, as in tests, do not share counters). The
gateway calls `observe_request`, `add_tokens`, `upstream_failed` and (through the usage recorder)
`usage_dropped`; every method is cheap and thread-safe. `exposition()` renders the text format; it
queries the database, so it is called off the event loop. With a `View` limited to some models (an API key's
allowlist) only the series of those models and their deployments are shown.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from lmstack import __version__
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

    # -- for the gateway ---------------------------------------------------------------------------------------

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

    def add_tokens(self, model: str, prompt: int, completion: int) -> None:
        series = self._model_series(model)
        if prompt > 0:
            series.prompt.inc(prompt)
        if completion > 0:
            series.completion.inc(completion)

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

    # -- for /metrics -----------------------------------------------------------------------------------------

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
