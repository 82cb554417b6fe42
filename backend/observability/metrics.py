"""Metrics through OpenTelemetry: the instruments, the process's MeterProvider, and
the admin view of them.

Instruments are created once here on the global meter (a proxy until the
provider exists) and recorded wherever the event happens; HTTP server duration
and active requests come from the FastAPI instrumentation (stable HTTP
semantic conventions: route templates in `http.route`, health probes and
/metrics excluded). The provider is made per process, at start-up (never before
a fork), with up to three readers:

- OTLP push (OTEL_METRICS_EXPORTER=otlp and an endpoint): every process,
  API and worker, sends its own series; the collector adds them up. This is
  the path for several uvicorn workers, tasks and Celery workers;
- Prometheus text for GET /metrics (METRICS_ENABLED), this process only;
- an in-memory reader behind /admin/metrics, this process only.

Names as Prometheus renders them: dots become underscores, seconds get
`_seconds`, counters `_total` (e.g. `loan_engine_pipeline_runs_total`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import DropAggregation, View
from prometheus_client import CollectorRegistry

from backend.config import Settings
from backend.observability.bounded import within

logger = structlog.get_logger(__name__)

METER_NAME = "loan_engine"
HTTP_DURATION = "http.server.request.duration"
# Seconds; phases of a 100k-loan tape take 0.1-2 s, queue waits up to minutes.
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}

meter = metrics.get_meter(METER_NAME)

pipeline_runs = meter.create_counter(
    "loan_engine.pipeline.runs", unit="{run}", description="Pipeline runs by final status"
)
pipeline_loans = meter.create_counter(
    "loan_engine.pipeline.loans", unit="{loan}", description="Loans read by completed runs"
)
phase_duration = meter.create_histogram(
    "loan_engine.pipeline.phase.duration",
    unit="s",
    description="Time spent in each phase of a completed phase run",
    explicit_bucket_boundaries_advisory=PHASE_BUCKETS,
)
queue_wait = meter.create_histogram(
    "loan_engine.pipeline.queue.wait",
    unit="s",
    description="From a run's queueing to its claim by an executor",
    explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
)
pipeline_exceptions = meter.create_counter(
    "loan_engine.pipeline.exceptions",
    unit="{exception}",
    description="Loan exceptions raised by completed runs, by rule",
)
ratelimit_decisions = meter.create_counter(
    "loan_engine.ratelimit.decisions",
    unit="{request}",
    description="Rate-limit decisions by rule and outcome",
)
ratelimit_storage_errors = meter.create_counter(
    "loan_engine.ratelimit.storage.errors",
    unit="{error}",
    description="Rate-limit storage calls that failed, timed out or were refused by the breaker",
)
slow_queries = meter.create_counter(
    "loan_engine.db.slow_queries",
    unit="{statement}",
    description="SQL statements slower than DB_SLOW_QUERY_MS",
)
spans_exported = meter.create_counter(
    "loan_engine.spans.exported", unit="{span}", description="Spans the exporter delivered"
)
spans_dropped = meter.create_counter(
    "loan_engine.spans.dropped",
    unit="{span}",
    description="Spans lost: the exporter failed or the export queue was full",
)

# What the observable gauges read; weak, so a disposed engine or an old app goes away.
_engines: weakref.WeakSet[Any] = weakref.WeakSet()
_breakers: weakref.WeakSet[Any] = weakref.WeakSet()
_queue_depth: dict[str, int] = {}


def watch_engine(sync_engine: Any) -> None:
    """Report this engine's pool in the `loan_engine.db.pool.*` gauges."""
    _engines.add(sync_engine)


def watch_breaker(breaker: Any) -> None:
    """Report this circuit breaker in `loan_engine.circuit.state`."""
    _breakers.add(breaker)


def set_queue_depth(value: int) -> None:
    """Runs queued over all processes, as last counted in the database by this process."""
    _queue_depth["queued"] = value


def _pool_figures() -> Iterator[tuple[str, int]]:
    for engine in list(_engines):
        pool = engine.pool
        if hasattr(pool, "checkedout"):
            yield "size", pool.size()
            yield "checked_out", pool.checkedout()
            yield "overflow", max(0, pool.overflow())
            # SQLAlchemy's QueuePool keeps its max_overflow private; -1 means unbounded.
            limit = getattr(pool, "_max_overflow", 0)
            yield "max", pool.size() + limit if limit >= 0 else 0


def _pool_gauge(figure: str) -> Any:
    def observe(_options: CallbackOptions) -> Iterable[Observation]:
        values = [value for name, value in _pool_figures() if name == figure]
        return [Observation(sum(values))] if values else []

    return observe


for _figure, _text in (
    ("size", "Connections the pool keeps"),
    ("checked_out", "Connections in use"),
    ("overflow", "Connections open beyond the pool size"),
    ("max", "Most connections the pool may open (size + DB_MAX_OVERFLOW)"),
):
    meter.create_observable_gauge(
        f"loan_engine.db.pool.{_figure}",
        callbacks=[_pool_gauge(_figure)],
        unit="{connection}",
        description=_text,
    )


def _observe_queue(_options: CallbackOptions) -> Iterable[Observation]:
    depth = _queue_depth.get("queued")
    return [] if depth is None else [Observation(depth)]


def _observe_circuits(_options: CallbackOptions) -> Iterable[Observation]:
    return [
        Observation(CIRCUIT_STATES[breaker.state], {"dependency": breaker.name})
        for breaker in list(_breakers)
    ]


meter.create_observable_gauge(
    "loan_engine.pipeline.queue.depth",
    callbacks=[_observe_queue],
    unit="{run}",
    description="Runs waiting to start (all processes, as counted by this one)",
)
meter.create_observable_gauge(
    "loan_engine.circuit.state",
    callbacks=[_observe_circuits],
    description="Circuit breaker state per dependency: 0 closed, 1 half open, 2 open",
)


# ------------------------------------------------------------------ the provider


@dataclass
class ProcessMetrics:
    """The MeterProvider of this process and its readers."""

    provider: MeterProvider
    admin_reader: InMemoryMetricReader
    registry: CollectorRegistry | None
    otlp: MetricReader | None
    resource: dict[str, Any] = field(default_factory=dict)


_process: ProcessMetrics | None = None
_process_lock = threading.Lock()


def build_metric_exporter(settings: Settings) -> Any | None:
    """The OTLP metric exporter OTEL_METRICS_EXPORTER names, or None.

    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT (the full URL) wins over
    OTEL_EXPORTER_OTLP_ENDPOINT (a base URL, to which `/v1/metrics` is added)."""
    signal_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip()
    base = settings.OTEL_EXPORTER_OTLP_ENDPOINT.rstrip("/")
    if settings.OTEL_METRICS_EXPORTER != "otlp" or not (signal_endpoint or base):
        return None
    from backend.observability.span_export import otlp_protocol

    if otlp_protocol(settings, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        endpoint = signal_endpoint or base
        return GrpcMetricExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(endpoint=signal_endpoint or f"{base}/v1/metrics")


# Histograms the HTTP instrumentation records that no dashboard, alarm or query uses:
# dropped at the source rather than aggregated by every reader on every request.
UNUSED_INSTRUMENTS = [
    View(instrument_name=name, aggregation=DropAggregation())
    for name in ("http.server.request.body.size", "http.server.response.body.size")
]


def start_metrics(settings: Settings, resource: Any) -> ProcessMetrics:
    """Create this process's MeterProvider (once) and make it the global one.

    Call after any fork (the OTLP reader runs a thread). A second call returns the
    first provider: one process, one set of series.
    """
    global _process
    with _process_lock:
        if _process is not None:
            return _process
        admin_reader = InMemoryMetricReader()
        readers: list[MetricReader] = [admin_reader]
        registry: CollectorRegistry | None = None
        # Every reader aggregates every measurement (about 30 us a request each): none
        # for a scrape this process would refuse (one of several workers, see scrape.py).
        if settings.METRICS_ENABLED and worker_count() == 1:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            registry = CollectorRegistry(auto_describe=True)
            readers.append(PrometheusMetricReader(registry=registry))
        otlp: MetricReader | None = None
        exporter = build_metric_exporter(settings)
        if exporter is not None:
            # OTEL_METRIC_EXPORT_INTERVAL (ms) is read by the reader itself.
            otlp = PeriodicExportingMetricReader(exporter)
            readers.append(otlp)
        provider = MeterProvider(
            metric_readers=readers,
            resource=resource,
            views=UNUSED_INSTRUMENTS,
            shutdown_on_exit=False,
        )
        metrics.set_meter_provider(provider)
        _process = ProcessMetrics(provider, admin_reader, registry, otlp, dict(resource.attributes))
        logger.info(
            "metrics.started",
            otlp=otlp is not None,
            prometheus=registry is not None,
            workers=worker_count(),
        )
        return _process


def process_metrics() -> ProcessMetrics | None:
    return _process


def flush_metrics(timeout_seconds: float) -> bool:
    """Push what OTLP has not sent yet, within `timeout_seconds` (False when cut off)."""
    current = _process
    if current is None or current.otlp is None:
        return True
    reader = current.otlp
    if within(
        timeout_seconds,
        lambda: reader.force_flush(int(timeout_seconds * 1000)),
        "otel-metrics-flush",
    ):
        return True
    logger.warning("metrics.flush.timeout", timeout_seconds=timeout_seconds)
    return False


def worker_count() -> int:
    """How many server processes share this one's port, as far as it can tell.

    WEB_CONCURRENCY (what the entrypoint passes to `uvicorn --workers`, and what
    uvicorn reads as its default) when set; otherwise a process spawned by a
    supervisor (`uvicorn --workers N`) counts as one of several.
    """
    configured = os.environ.get("WEB_CONCURRENCY", "").strip()
    if configured.isdigit():
        return max(1, int(configured))
    if multiprocessing.parent_process() is not None and "--reload" not in sys.argv:
        return 2
    return 1


# ------------------------------------------------------------------ admin view


def percentile_from_buckets(bounds: tuple[float, ...], counts: list[int], fraction: float) -> float:
    """The `fraction` quantile estimated from histogram buckets (linear within the
    bucket, the way Prometheus' histogram_quantile does); 0.0 when empty."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = fraction * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            lower = bounds[index - 1] if index > 0 else 0.0
            if index >= len(bounds):
                return bounds[-1] if bounds else 0.0  # the +Inf bucket: its lower bound
            upper = bounds[index]
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return bounds[-1] if bounds else 0.0


@dataclass
class _Raw:
    """Cumulative figures read off the instruments at one moment."""

    requests: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    buckets: list[int] = field(default_factory=list)
    bounds: tuple[float, ...] = ()
    max_seconds: float = 0.0
    runs: Counter[str] = field(default_factory=Counter)
    loans: int = 0


def _points(data: MetricsData | None, name: str) -> Iterator[Any]:
    if data is None:
        return
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == name:
                    yield from metric.data.data_points


def read_raw(data: MetricsData | None) -> _Raw:
    raw = _Raw()
    for point in _points(data, HTTP_DURATION):
        assert isinstance(point, HistogramDataPoint)
        attributes = point.attributes or {}
        key = (
            str(attributes.get("http.request.method", "")),
            str(attributes.get("http.route", "unmatched")),
            int(str(attributes.get("http.response.status_code", 0) or 0)),
        )
        raw.requests[key] += point.count
        bounds = tuple(point.explicit_bounds)
        if not raw.buckets:
            raw.bounds, raw.buckets = bounds, [0] * len(point.bucket_counts)
        if bounds == raw.bounds:
            raw.buckets = [a + b for a, b in zip(raw.buckets, point.bucket_counts, strict=True)]
        raw.max_seconds = max(raw.max_seconds, point.max or 0.0)
    for point in _points(data, "loan_engine.pipeline.runs"):
        assert isinstance(point, NumberDataPoint)
        raw.runs[str((point.attributes or {}).get("status", ""))] += int(point.value)
    for point in _points(data, "loan_engine.pipeline.loans"):
        raw.loans += int(point.value)
    return raw


class AdminMetrics:
    """/admin/metrics: figures read off this process's instruments.

    Totals count since the process started; the window since the last reset
    (a baseline subtracted from the cumulative instruments).
    """

    def __init__(self, reader: InMemoryMetricReader | None = None) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        self._started = time.time()
        self._window_started = self._started
        self._baseline = _Raw()

    def _read(self) -> _Raw:
        reader = self._reader
        if reader is None:
            current = process_metrics()
            reader = current.admin_reader if current is not None else None
        return read_raw(reader.get_metrics_data() if reader is not None else None)

    def reset_window(self) -> None:
        raw = self._read()
        with self._lock:
            self._baseline = raw
            self._window_started = time.time()

    def snapshot(self) -> dict[str, Any]:
        now_raw = self._read()
        with self._lock:
            base, window_started = self._baseline, self._window_started
        window = now_raw.requests - base.requests
        total_requests = sum(now_raw.requests.values())
        total_errors = sum(n for (_m, _r, status), n in now_raw.requests.items() if status >= 500)
        window_requests = sum(window.values())
        window_errors = sum(n for (_m, _r, status), n in window.items() if status >= 500)
        buckets = list(now_raw.buckets)
        if base.buckets and base.bounds == now_raw.bounds:
            buckets = [a - b for a, b in zip(buckets, base.buckets, strict=True)]
        statuses: Counter[int] = Counter()
        routes: Counter[str] = Counter()
        for (method, route, status), count in window.items():
            statuses[status] += count
            routes[f"{method} {route}"] += count

        def ms(fraction: float) -> float:
            return round(percentile_from_buckets(now_raw.bounds, buckets, fraction) * 1000, 2)

        now = time.time()
        current = process_metrics()
        return {
            "scope": {
                "covers": "this process",
                "pid": os.getpid(),
                "service_instance_id": (current.resource if current else {}).get(
                    "service.instance.id"
                ),
                "workers_on_this_port": worker_count(),
                "all_processes": "sum over instances: the collector's metrics (OTLP push)",
            },
            "uptime_seconds": round(now - self._started, 1),
            "window_seconds": round(now - window_started, 1),
            "requests": {
                "total": total_requests,
                "errors_total": total_errors,
                "error_rate": _rate(total_errors, total_requests),
                "window": window_requests,
                "window_errors": window_errors,
                "window_error_rate": _rate(window_errors, window_requests),
            },
            "latency_ms": {
                "samples": sum(buckets),
                "p50": ms(0.50),
                "p95": ms(0.95),
                "p99": ms(0.99),
                "max": round(now_raw.max_seconds * 1000, 2),
            },
            "status_codes": {str(code): n for code, n in sorted(statuses.items())},
            "top_routes": dict(routes.most_common(10)),
            "pipeline": {
                "runs_total": sum(now_raw.runs.values()),
                "completed": now_raw.runs.get("completed", 0),
                "failed": now_raw.runs.get("failed", 0),
                "interrupted": now_raw.runs.get("interrupted", 0),
                "loans_processed": now_raw.loans,
            },
        }


def _rate(part: int, whole: int) -> float:
    return round(part / whole * 100, 2) if whole else 0.0
