"""Instrumentation: which libraries make spans, installed explicitly.

The ASGI server span (declared in the app's request path), SQLAlchemy on an
engine's sync engine (once per engine), Celery once per process. asyncpg is
not instrumented, so each statement is exactly one span. None of these take a
tracer provider: they resolve the global one lazily, which is set in each
process after any fork (`span_export.process_tracer_provider`).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.util.http import sanitize_method
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import Scope

from backend.middleware.request_start import route_of
from backend.observability import metrics as app_metrics

# The instrumentations' HTTP metrics and attributes follow the stable HTTP conventions
# (http.server.request.duration in seconds, http.route). OpenTelemetry reads this once
# per process, when the first instrumentation is created; every instrumentation is
# created through this module, so setting it at import comes first.
os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")

# Health checks and metrics scrapes are not traced. ExcludeList matches these against
# the full URL (scheme://host/path), so each is anchored on both ends: /api/healthcare
# and /api/health are still traced.
EXCLUDED_URLS = ",".join(
    rf"^[a-z]+://[^/]+{path}/?$"
    for path in ("/health", "/health/live", "/health/ready", "/metrics")
)


def server_span_details(scope: Scope) -> tuple[str, dict[str, str]]:
    """Server span name and attributes: `GET /api/pipeline/runs/{run_id}` and http.route,
    from the template RequestStartMiddleware looked up (the method alone when none)."""
    method = sanitize_method(str(scope.get("method", "")).strip())
    if method == "_OTHER":
        method = "HTTP"
    route = route_of(scope)
    if route:
        return f"{method} {route}", {"http.route": route}
    return method, {}


def server_span_options() -> dict[str, Any]:
    """Options of the OpenTelemetry ASGI middleware (the server span and HTTP metrics),
    which the app declares in its request path: probes and scrapes untraced, no
    receive/send sub-spans, names from the route template."""
    return {
        "excluded_urls": EXCLUDED_URLS,
        "exclude_spans": ["receive", "send"],
        "default_span_details": server_span_details,
    }


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
    app_metrics.watch_engine(sync_engine)


def instrument_celery() -> None:
    """Publish and task spans for Celery, with the trace context carried in each message.

    Process-wide (Celery signals); a second call does nothing. Call it once the
    process provider exists: in an API process's lifespan, in each worker
    process after the fork.
    """
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
