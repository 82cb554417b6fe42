"""The application factory and the ASGI app object (`backend.api.main:app`)."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import Depends, FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace.export import SpanExporter
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.middleware import Middleware

from backend.admin.routes import router as admin_router
from backend.api.dependencies import require_json_body
from backend.api.openapi import install_openapi
from backend.auth.routes import router as auth_router
from backend.config import ConfigurationError, Settings, config_summary, get_settings
from backend.database import Database
from backend.errors import install_error_handlers
from backend.files.routes import router as files_router
from backend.lifecycle import drain_pipeline, install_drain_handler
from backend.middleware.client_ip import TrustedProxies
from backend.middleware.compression import CompressionMiddleware
from backend.middleware.cors import EnvelopeCORSMiddleware
from backend.middleware.error_handler import ErrorHandlerMiddleware
from backend.middleware.rate_limiter import RateLimiter, RateLimitMiddleware
from backend.middleware.request_context import RequestContextMiddleware
from backend.middleware.request_limits import MB, RequestLimitsMiddleware
from backend.middleware.request_start import RequestStartMiddleware
from backend.middleware.security_headers import SecurityHeaders
from backend.middleware.trusted_host import TrustedHostMiddleware
from backend.observability import metrics as app_metrics
from backend.observability.health import router as health_router
from backend.observability.instrumentation import instrument_engine, server_span_options
from backend.observability.logging_config import (
    configure_logging,
    replay_warnings,
    warnings_held_for_logging,
)
from backend.observability.metrics import AdminMetrics
from backend.observability.scrape import router as metrics_router
from backend.observability.span_export import Tracing, process_tracer_provider
from backend.pipeline.dispatch import RunDispatcher
from backend.pipeline.routes import router as pipeline_router
from backend.pipeline.runner import PipelineRunner
from backend.resilience import CircuitBreaker
from backend.runtime import tune_for_latency
from backend.storage import Storage, create_storage
from backend.teams.routes import router as teams_router
from backend.users import service as users_service
from backend.users.routes import router as users_router

logger = structlog.get_logger(__name__)


async def seed_admin(database: Database, settings: Settings) -> None:
    """Create the bootstrap admin if none exists; a database not migrated yet is logged."""
    try:
        async with database.session() as session:
            await users_service.ensure_admin(session, settings)
    except (SQLAlchemyError, OSError) as exc:
        # OSError: the database is unreachable; start anyway and report not ready.
        logger.warning("admin.seed.skipped", reason=type(exc).__name__)


def create_dispatcher(database: Database, storage: Storage, settings: Settings) -> RunDispatcher:
    """The executor PIPELINE_EXECUTOR names: runs in this process, or on Celery workers."""
    if settings.PIPELINE_EXECUTOR == "celery":
        from backend.worker.publisher import CeleryPublisher

        return CeleryPublisher(database, settings)
    return PipelineRunner(database, storage, settings)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Tracing starts here, in each worker process (never before a fork): the exporter
    # thread and service.instance.id belong to the worker.
    tracing: Tracing = app.state.tracing
    tracing.start()
    # Metrics share the process's resource (service.instance.id) with the traces.
    app_metrics.start_metrics(settings, process_tracer_provider(settings).resource)
    # Hardening: one redacted line with the effective configuration.
    logger.info("config.summary", **config_summary(settings))
    app.state.started_at = time.monotonic()
    app.state.draining = False
    database = Database(settings)
    instrument_engine(database.engine)
    app.state.db = database
    storage = create_storage(settings)
    app.state.storage = storage
    runner = create_dispatcher(database, storage, settings)
    app.state.runner = runner
    # Circuit breakers by dependency, for readiness and the admin metrics.
    breakers = [database.breaker, getattr(runner, "breaker", None)]
    limiter_now: RateLimiter | None = getattr(app.state, "rate_limiter", None)
    if limiter_now is not None:
        breakers.append(limiter_now.breaker)
        await limiter_now.warm_up()
    app.state.breakers = {b.name: b for b in breakers if isinstance(b, CircuitBreaker)}
    for breaker in app.state.breakers.values():
        app_metrics.watch_breaker(breaker)
    await seed_admin(database, settings)
    # Recovery takes only runs whose owner's lease has expired: starting a process never
    # touches the runs of live ones.
    await runner.start()
    # Hardening: SIGTERM flips readiness to "draining" before uvicorn stops accepting.
    uninstall_drain_handler = install_drain_handler(app, settings)
    tune_for_latency(settings)
    logger.info("app.started", environment=settings.ENVIRONMENT, version=settings.APP_VERSION)
    try:
        yield
    finally:
        # In-flight requests are done here. Runs need the database and storage: drain
        # them before either goes away; spans go out last (bounded, never hangs).
        app.state.draining = True
        await drain_pipeline(app, settings)
        limiter: RateLimiter | None = getattr(app.state, "rate_limiter", None)
        if limiter is not None:
            await limiter.close()
        await storage.close()
        await database.dispose()
        logger.info("app.stopped")
        app_metrics.flush_metrics(settings.OTEL_SHUTDOWN_TIMEOUT_SECONDS)
        tracing.shutdown()
        uninstall_drain_handler()


def request_path(settings: Settings, limiter: RateLimiter | None) -> list[Middleware]:
    """Every layer a request passes through, outermost first (ARCHITECTURE.md "The path
    of a request"). FastAPI puts its ServerErrorMiddleware outside this list (nothing
    reaches it: the request context renders what escapes) and its exception handlers
    and the router inside.
    """
    trusted = TrustedProxies(settings.TRUSTED_PROXIES)
    security = (
        SecurityHeaders(trusted_proxies=trusted, production=settings.ENVIRONMENT == "production")
        if settings.ENABLE_SECURITY_HEADERS
        else None
    )
    cors = (
        [Middleware(EnvelopeCORSMiddleware, **cors_options(settings))]
        if settings.CORS_ORIGINS
        else []
    )
    rate_limit = (
        [Middleware(RateLimitMiddleware, limiter=limiter, trusted_proxies=trusted)]
        if limiter is not None
        else []
    )
    return [
        # Clean trace and log contexts; the route template looked up once, for all below.
        Middleware(RequestStartMiddleware),
        # The server span (a 500 from any layer below is an error span) and HTTP metrics.
        Middleware(OpenTelemetryMiddleware, **server_span_options()),
        # Request id, log context, response headers (request id, Server-Timing, security,
        # Connection: close while draining), the access line; the last-resort envelope.
        Middleware(RequestContextMiddleware, settings=settings, security=security),
        # Inside the response headers: a preflight (allowed or refused) carries them too.
        *cors,
        # Unhandled exceptions become the envelope here, inside CORS and the headers.
        Middleware(ErrorHandlerMiddleware),
        Middleware(TrustedHostMiddleware, allowed_hosts=settings.TRUSTED_HOSTS),
        # Every body from here in (error envelopes included) may be gzipped; the access
        # line counts the bytes sent. File downloads stream as stored.
        Middleware(
            CompressionMiddleware, exclude_paths=[files_router.url_path_for("download_file")]
        ),
        Middleware(
            RequestLimitsMiddleware,
            max_body_bytes=settings.MAX_REQUEST_SIZE_MB * MB,
            max_upload_bytes=settings.MAX_UPLOAD_SIZE_MB * MB,
            timeout_seconds=settings.REQUEST_TIMEOUT_SECONDS,
        ),
        *rate_limit,
    ]


def cors_options(settings: Settings) -> dict[str, Any]:
    return {
        "allow_origins": settings.CORS_ORIGINS,
        "allow_credentials": True,
        "allow_methods": ["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
        "allow_headers": ["Authorization", "Content-Type", "X-Request-ID"],
        # Let browser clients read the request id, the rate-limit state and Retry-After.
        "expose_headers": [
            "X-Request-ID",
            "Server-Timing",
            "Retry-After",
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
            "RateLimit",
            "RateLimit-Policy",
        ],
    }


def create_app(
    settings: Settings | None = None, *, span_exporter: SpanExporter | None = None
) -> FastAPI:
    """Build a fully wired application for `settings` (the process settings by default).

    `span_exporter` (tests) receives this app's spans instead of the configured exporter.
    """
    # Reading settings may warn (the generated development SECRET_KEY) before logging
    # exists: hold those warnings and let them come out as log lines.
    with warnings_held_for_logging() as early_warnings:
        settings = settings or get_settings()
    configure_logging(settings)
    replay_warnings(early_warnings)
    limiter = RateLimiter(settings) if settings.RATE_LIMIT_ENABLED else None
    app = FastAPI(
        title=settings.APP_NAME,
        version=settings.APP_VERSION,
        debug=False,
        lifespan=lifespan,
        middleware=request_path(settings, limiter),
        # The server span and HTTP metrics come from the OpenTelemetry middleware in
        # request_path(); FastAPI's own telemetry stays off (no second span per request).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # One check for every route with a JSON body: another Content-Type is a 415.
        dependencies=[Depends(require_json_body)],
    )
    app.state.settings = settings
    app.state.tracing = Tracing(settings, span_exporter)
    app.state.metrics = AdminMetrics()
    if limiter is not None:
        app.state.rate_limiter = limiter
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(auth_router)
    app.include_router(users_router)
    app.include_router(teams_router)
    app.include_router(files_router)
    app.include_router(pipeline_router)
    if settings.ADMIN_DIAGNOSTICS_ENABLED:
        app.include_router(admin_router)
    if settings.ENVIRONMENT == "test":
        from backend.api.debug import router as debug_router

        app.include_router(debug_router)
    install_openapi(app)
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn backend.api.main:app` builds the app on first access, so importing this
    # module (tests, the CLI) never reads the environment or touches the database.
    if name == "app":
        try:
            application = create_app()
        except (ConfigurationError, ValidationError) as exc:
            # Start-up refusal: one clear line and a non-zero exit, no traceback.
            sys.stderr.write(f"configuration error: {exc}\n")
            raise SystemExit(1) from None
        globals()["app"] = application
        return application
    raise AttributeError(name)
