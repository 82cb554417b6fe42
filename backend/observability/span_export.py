"""Span export: one TracerProvider per process, one exporter per application.

Contracts:

- The process-wide provider (resource, sampler, X-Ray id generator) is created
  the first time an application starts in a process, i.e. in the lifespan of
  each worker, never at import and never before a fork. The global tracer
  provider can be set only once, so later applications in the same process
  (tests) share it.
- Each application adds its own span processor (its exporter) to that provider
  on start and removes it on shutdown, through one routing processor. Tests
  inject an exporter with `create_app(settings, span_exporter=...)` and see
  only the spans of their own application.
- Exporters receive redacted copies of the spans, and what they deliver or
  lose is counted in `loan_engine.spans.*`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
from collections.abc import Sequence

import structlog
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from backend.config import Settings
from backend.observability import metrics as app_metrics
from backend.observability.bounded import within
from backend.observability.redaction import RedactingSpanExporter
from backend.observability.trace_ids import AlbAwareIdGenerator, build_propagator

logger = structlog.get_logger(__name__)


# --------------------------------------------------------------------- provider


def build_sampler(settings: Settings) -> sampling.Sampler:
    """The sampler named by OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG."""
    ratio = settings.OTEL_TRACES_SAMPLER_ARG
    samplers: dict[str, sampling.Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    return samplers[settings.OTEL_TRACES_SAMPLER]


def parse_resource_attributes(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (OTEL_RESOURCE_ATTRIBUTES); values may contain `=`; blanks skipped."""
    attributes: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = value.strip()
    return attributes


def build_resource(settings: Settings) -> Resource:
    """service.name/version, deployment.environment, a per-process service.instance.id."""
    attributes: dict[str, str] = {
        "deployment.environment": settings.ENVIRONMENT,
        "deployment.environment.name": settings.ENVIRONMENT,
        "service.version": settings.APP_VERSION,
        # Unique per worker process, so two workers of one host are told apart.
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
    }
    attributes.update(parse_resource_attributes(settings.OTEL_RESOURCE_ATTRIBUTES))
    # OTEL_SERVICE_NAME wins over service.name in OTEL_RESOURCE_ATTRIBUTES (OTel spec).
    attributes["service.name"] = settings.OTEL_SERVICE_NAME
    return Resource.create(attributes)


class RoutingSpanProcessor(SpanProcessor):
    """One processor on the provider that forwards to the processors of live applications."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processors: tuple[SpanProcessor, ...] = ()

    def add(self, processor: SpanProcessor) -> None:
        with self._lock:
            self._processors = (*self._processors, processor)

    def remove(self, processor: SpanProcessor) -> None:
        with self._lock:
            self._processors = tuple(p for p in self._processors if p is not processor)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        for processor in self._processors:
            processor.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        for processor in self._processors:
            processor.on_end(span)

    def shutdown(self) -> None:
        for processor in self._processors:
            processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self._processors)


_router = RoutingSpanProcessor()
_provider: TracerProvider | None = None
_provider_lock = threading.Lock()


def process_tracer_provider(settings: Settings) -> TracerProvider:
    """The provider of this process, created (and made global) on first call."""
    global _provider
    with _provider_lock:
        if _provider is None:
            provider = TracerProvider(
                resource=build_resource(settings),
                sampler=build_sampler(settings),
                id_generator=AlbAwareIdGenerator(),
                # Shutdown is ours (bounded, in the lifespan), not an atexit hook that may hang.
                shutdown_on_exit=False,
            )
            provider.add_span_processor(_router)
            trace.set_tracer_provider(provider)
            current = trace.get_tracer_provider()
            if current is not provider and isinstance(current, TracerProvider):
                # Someone (e.g. auto-instrumentation) set a provider first: export through it.
                current.add_span_processor(_router)
                provider = current
            _provider = provider
        return _provider


# -------------------------------------------------------------------- exporters


def otlp_protocol(settings: Settings, signal: str) -> str:
    """OTEL_EXPORTER_OTLP_<SIGNAL>_PROTOCOL when set, else OTEL_EXPORTER_OTLP_PROTOCOL.

    Headers need nothing of ours: the exporters read OTEL_EXPORTER_OTLP_<SIGNAL>_HEADERS
    and OTEL_EXPORTER_OTLP_HEADERS themselves."""
    specific = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "").strip()
    return specific or settings.OTEL_EXPORTER_OTLP_PROTOCOL


def build_span_exporter(settings: Settings) -> SpanExporter | None:
    """The exporter named by OTEL_TRACES_EXPORTER, or None when nothing is exported."""
    if settings.OTEL_TRACES_EXPORTER == "console":
        # stderr: stdout carries the JSON log lines and must stay one object per line.
        return ConsoleSpanExporter(out=sys.stderr)
    # The signal-specific variable (a full URL) wins over the base endpoint.
    signal_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base = settings.OTEL_EXPORTER_OTLP_ENDPOINT.rstrip("/")
    if settings.OTEL_TRACES_EXPORTER == "none" or not (signal_endpoint or base):
        return None
    endpoint = signal_endpoint or base
    if otlp_protocol(settings, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    # OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base URL; the signal path is ours.
    return HttpExporter(endpoint=signal_endpoint or f"{base}/v1/traces")


class CountingExporter(SpanExporter):
    """Counts what `inner` delivers and what it loses, in `loan_engine.spans.*`."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            app_metrics.spans_exported.add(len(spans))
        else:
            app_metrics.spans_dropped.add(len(spans), {"reason": "export_failed"})
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that also counts the spans it drops because its queue is
    full (the SDK only logs those)."""

    def on_end(self, span: ReadableSpan) -> None:
        # The SDK's queue is private; without it nothing is counted, nothing breaks.
        batcher = getattr(self, "_batch_processor", None)
        queue = getattr(batcher, "_queue", None)
        if queue is not None and queue.maxlen is not None and len(queue) >= queue.maxlen:
            app_metrics.spans_dropped.add(1, {"reason": "queue_full"})
        super().on_end(span)


def build_span_processor(
    settings: Settings, span_exporter: SpanExporter | None = None
) -> SpanProcessor | None:
    """The processor for this application's exporter, or None when nothing is exported.

    An injected exporter (tests) is wrapped synchronously, so finished spans are
    there as soon as the request returns; configured exporters are batched.
    Either way the exporter receives redacted copies (`RedactingSpanExporter`).
    """
    if span_exporter is not None:
        return SimpleSpanProcessor(RedactingSpanExporter(span_exporter))
    exporter = build_span_exporter(settings)
    if exporter is None:
        return None
    return CountingBatchSpanProcessor(CountingExporter(RedactingSpanExporter(exporter)))


# ---------------------------------------------------------------- per application


class Tracing:
    """The tracing of one application: its exporter, started and stopped with the app."""

    def __init__(self, settings: Settings, span_exporter: SpanExporter | None = None) -> None:
        self.settings = settings
        self.span_exporter = span_exporter
        self.processor: SpanProcessor | None = None

    def start(self) -> None:
        """Create the process provider if needed and start exporting this app's spans."""
        process_tracer_provider(self.settings)
        propagate.set_global_textmap(build_propagator(self.settings.OTEL_PROPAGATORS))
        self.processor = build_span_processor(self.settings, self.span_exporter)
        if self.processor is not None:
            _router.add(self.processor)
        if self.processor is None:
            exporter = "none"
        elif self.span_exporter is not None:
            exporter = "injected"
        else:
            exporter = self.settings.OTEL_TRACES_EXPORTER
        logger.info(
            "tracing.started",
            exporter=exporter,
            protocol=self.settings.OTEL_EXPORTER_OTLP_PROTOCOL,
            endpoint=self.settings.OTEL_EXPORTER_OTLP_ENDPOINT or None,
        )

    def shutdown(self) -> bool:
        """Flush and stop this app's exporter within OTEL_SHUTDOWN_TIMEOUT_SECONDS.

        Returns False when the bound was hit (the collector is slow or gone): the
        remaining spans are dropped rather than holding up the process exit.
        """
        processor, self.processor = self.processor, None
        if processor is None:
            return True
        _router.remove(processor)
        timeout = self.settings.OTEL_SHUTDOWN_TIMEOUT_SECONDS

        def flush_and_stop() -> None:
            processor.force_flush(int(timeout * 1000))
            processor.shutdown()

        if within(timeout, flush_and_stop, "otel-shutdown"):
            return True
        logger.warning("tracing.shutdown.timeout", timeout_seconds=timeout)
        return False
