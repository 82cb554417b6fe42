"""OpenTelemetry tracing: one TracerProvider per process, span export per application.

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
- Instrumentation is explicit: FastAPI on the app (outermost), SQLAlchemy on an
  engine's sync engine (once per engine). asyncpg is not instrumented, so each
  statement is exactly one span.
- The ALB sends `X-Amzn-Trace-Id: Root=1-...` without a Parent. When a request
  has no other trace parent, its trace id becomes that Root, so ALB access
  logs, application logs and X-Ray share one id.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
import weakref
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import structlog
from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.extension.aws.trace import AwsXRayIdGenerator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.config import Settings

logger = structlog.get_logger(__name__)

ALB_TRACE_HEADER = "x-amzn-trace-id"
# Context key under which the ALB propagator leaves a Root-only trace id.
_ALB_ROOT_KEY = otel_context.create_key("loan-engine.alb-root-trace-id")

# Health checks and metrics scrapes are not traced. ExcludeList matches these against
# the full URL (scheme://host/path), so each is anchored on both ends: /api/healthcare
# and /api/health are still traced.
EXCLUDED_URLS = ",".join(
    rf"^[a-z]+://[^/]+{path}/?$"
    for path in ("/health", "/health/live", "/health/ready", "/metrics")
)


# --------------------------------------------------------------------------- ids


def xray_trace_id(trace_id: int | str) -> str:
    """The X-Ray form `1-<8 hex>-<24 hex>` of a W3C trace id (int or 32 hex chars)."""
    hex_id = format(trace_id, "032x") if isinstance(trace_id, int) else trace_id.lower()
    return f"1-{hex_id[:8]}-{hex_id[8:]}"


def trace_id_from_xray(value: str) -> int | None:
    """The W3C trace id of an X-Ray id `1-<8 hex>-<24 hex>`, or None when malformed."""
    parts = value.strip().split("-")
    if len(parts) != 3 or parts[0] != "1" or len(parts[1]) != 8 or len(parts[2]) != 24:
        return None
    try:
        trace_id = int(parts[1] + parts[2], 16)
    except ValueError:
        return None
    return trace_id or None


def parse_amzn_trace_header(value: str) -> dict[str, str]:
    """`Self=...;Root=1-...;Parent=...;Sampled=1` as a dict (keys as sent)."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, item = part.strip().partition("=")
        if sep and key:
            fields[key] = item
    return fields


def trace_url(settings: Settings, trace_id: str) -> str:
    """Where a person opens trace `trace_id` (32 hex): Jaeger or the X-Ray console."""
    if settings.TRACE_UI == "xray":
        region = settings.AWS_REGION
        return (
            f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}"
            f"#xray:traces/{xray_trace_id(trace_id)}"
        )
    return f"{settings.TRACE_UI_URL.rstrip('/')}/trace/{trace_id}"


class AlbRootPropagator(TextMapPropagator):
    """Adopt the ALB's Root-only `X-Amzn-Trace-Id` as the trace id of a new trace.

    Runs after the configured propagators: when they found a parent it does
    nothing; otherwise it leaves the Root in the context, where
    `AlbAwareIdGenerator` picks it up for the server span. It injects nothing.
    """

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        context = context if context is not None else Context()
        if trace.get_current_span(context).get_span_context().is_valid:
            return context
        values = getter.get(carrier, ALB_TRACE_HEADER)
        if not values:
            return context
        root = parse_amzn_trace_header(values[0]).get("Root")
        trace_id = trace_id_from_xray(root) if root else None
        if trace_id is None:
            return context
        return otel_context.set_value(_ALB_ROOT_KEY, trace_id, context)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        return None

    @property
    def fields(self) -> set[str]:
        return set()


class AlbAwareIdGenerator(AwsXRayIdGenerator):
    """X-Ray ids (timestamp-prefixed, valid W3C), or the ALB Root for a request's new trace."""

    def generate_trace_id(self) -> int:
        # The ASGI middleware attaches the extracted context just before starting the
        # server span, so the Root is visible here only for that span: any later span
        # in the request has a valid current span and gets a fresh id or its parent's.
        root = otel_context.get_value(_ALB_ROOT_KEY)
        if isinstance(root, int) and not trace.get_current_span().get_span_context().is_valid:
            return root
        return super().generate_trace_id()


def plan_trace_id() -> int | None:
    """A fresh trace id that the next root span started by `new_trace_context` will take.

    None when the process provider does not use `AlbAwareIdGenerator` (another
    provider was installed first, or tracing is not started): the id cannot be
    chosen in advance then, and the caller reads it from the span once started.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(getattr(provider, "id_generator", None), AlbAwareIdGenerator):
        return None
    return AwsXRayIdGenerator().generate_trace_id()


def new_trace_context(trace_id: int | None = None) -> Context:
    """An empty context (no parent span, no baggage) for starting a NEW trace.

    Attach it while starting the root span: with `trace_id` (from `plan_trace_id`)
    the span takes that id, otherwise a fresh one. The id generator reads the
    attached context, not the one passed to `start_span`, hence "attach".
    """
    context = Context()
    if trace_id is None:
        return context
    # The same slot the ALB Root uses: "the trace id of the next root span here".
    return otel_context.set_value(_ALB_ROOT_KEY, trace_id, context)


def build_propagator(names: Iterable[str]) -> TextMapPropagator:
    """The composite of the named propagators (entry points), then the ALB Root one."""
    propagators: list[TextMapPropagator] = []
    for name in names:
        name = name.strip().lower()
        if not name or name == "none":
            continue
        found = entry_points(group="opentelemetry_propagator", name=name)
        if not found:
            raise ValueError(f"unknown OTEL_PROPAGATORS entry: {name!r}")
        propagators.append(next(iter(found)).load()())
    propagators.append(AlbRootPropagator())
    return CompositePropagator(propagators)


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


def build_span_exporter(settings: Settings) -> SpanExporter | None:
    """The exporter named by OTEL_TRACES_EXPORTER, or None when nothing is exported."""
    if settings.OTEL_TRACES_EXPORTER == "console":
        # stderr: stdout carries the JSON log lines and must stay one object per line.
        return ConsoleSpanExporter(out=sys.stderr)
    if settings.OTEL_TRACES_EXPORTER == "none" or not settings.OTEL_EXPORTER_OTLP_ENDPOINT:
        return None
    endpoint = settings.OTEL_EXPORTER_OTLP_ENDPOINT.rstrip("/")
    if settings.OTEL_EXPORTER_OTLP_PROTOCOL == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    # OTEL_EXPORTER_OTLP_ENDPOINT is the collector's base URL; the signal path is ours.
    return HttpExporter(endpoint=f"{endpoint}/v1/traces")


def build_span_processor(
    settings: Settings, span_exporter: SpanExporter | None = None
) -> SpanProcessor | None:
    """The processor for this application's exporter, or None when nothing is exported.

    An injected exporter (tests) is wrapped synchronously, so finished spans are
    there as soon as the request returns; configured exporters are batched.
    """
    if span_exporter is not None:
        return SimpleSpanProcessor(span_exporter)
    exporter = build_span_exporter(settings)
    return BatchSpanProcessor(exporter) if exporter is not None else None


# --------------------------------------------------------------- instrumentation


def instrument_app(app: FastAPI) -> None:
    """Server spans for `app`: outermost, route-template names, no receive/send sub-spans."""
    # No tracer_provider: the instrumentation resolves the global provider lazily, which
    # the lifespan sets in each worker after any fork.
    FastAPIInstrumentor.instrument_app(
        app, excluded_urls=EXCLUDED_URLS, exclude_spans=["receive", "send"]
    )


_instrumented_engines: weakref.WeakSet[Any] = weakref.WeakSet()


def instrument_engine(engine: AsyncEngine) -> None:
    """One client span per SQL statement on `engine`; a second call is a no-op."""
    sync_engine = engine.sync_engine
    if sync_engine in _instrumented_engines:
        return
    # EngineTracer on this engine only: SQLAlchemyInstrumentor().instrument() would also
    # patch create_engine for the whole process and can run only once per process.
    tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy")
    connections_usage = metrics.get_meter("opentelemetry.instrumentation.sqlalchemy")
    EngineTracer(  # type: ignore[no-untyped-call]
        tracer,
        sync_engine,
        connections_usage.create_up_down_counter(
            name="db.client.connections.usage", unit="connections"
        ),
    )
    _instrumented_engines.add(sync_engine)


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
            # The SDK's force_flush ignores its timeout and the exporter retries with
            # backoff; a daemon thread with a bounded join is the only hard bound.
            processor.force_flush(int(timeout * 1000))
            processor.shutdown()

        worker = threading.Thread(target=flush_and_stop, name="otel-shutdown", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            logger.warning("tracing.shutdown.timeout", timeout_seconds=timeout)
            return False
        return True
