"""The application factory and the ASGI app object (`backend.api.main:app`)."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.sdk.trace.export import SpanExporter
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from backend.admin.routes import router as admin_router
from backend.auth.routes import router as auth_router
from backend.config import ConfigurationError, Settings, config_summary, get_settings
from backend.database import Database
from backend.errors import install_error_handlers
from backend.files.routes import router as files_router
from backend.lifecycle import drain_pipeline, install_drain_handler
from backend.middleware.client_ip import TrustedProxies
from backend.middleware.error_handler import ErrorHandlerMiddleware
from backend.middleware.rate_limiter import RateLimiter, RateLimitMiddleware
from backend.middleware.request_context import install_request_context
from backend.middleware.request_limits import MB, RequestLimitsMiddleware
from backend.middleware.security_headers import SecurityHeadersMiddleware
from backend.middleware.trusted_host import TrustedHostMiddleware
from backend.observability.health import router as health_router
from backend.observability.logging_config import (
    configure_logging,
    replay_warnings,
    warnings_held_for_logging,
)
from backend.observability.metrics import MetricsCollector
from backend.observability.tracing import Tracing, instrument_app, instrument_engine
from backend.pipeline.routes import router as pipeline_router
from backend.pipeline.runner import PipelineRunner
from backend.storage import create_storage
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


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Tracing starts here, in each worker process (never before a fork): the exporter
    # thread and service.instance.id belong to the worker.
    tracing: Tracing = app.state.tracing
    tracing.start()
    # Hardening: one redacted line with the effective configuration.
    logger.info("config.summary", **config_summary(settings))
    app.state.started_at = time.monotonic()
    app.state.draining = False
    database = Database(settings)
    instrument_engine(database.engine)
    app.state.db = database
    storage = create_storage(settings)
    app.state.storage = storage
    runner = PipelineRunner(database, storage, settings, metrics=app.state.metrics)
    app.state.runner = runner
    await seed_admin(database, settings)
    await runner.recover()
    # Hardening: SIGTERM flips readiness to "draining" before uvicorn stops accepting.
    uninstall_drain_handler = install_drain_handler(app, settings)
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
        tracing.shutdown()
        uninstall_drain_handler()


def add_hardening_middleware(app: FastAPI, settings: Settings) -> None:
    """Hardening layers; outermost first once built: [security headers], trusted host,
    error envelope, body size/time limits, [rate limit], then the router.

    `add_middleware` puts each new layer outside the previous ones, so they are
    added innermost first. Request context and the OTel server span go outside these.
    """
    trusted = TrustedProxies(settings.TRUSTED_PROXIES)
    if settings.RATE_LIMIT_ENABLED:
        limiter = RateLimiter(settings)
        app.state.rate_limiter = limiter
        app.add_middleware(RateLimitMiddleware, limiter=limiter, trusted_proxies=trusted)
    app.add_middleware(
        RequestLimitsMiddleware,
        max_body_bytes=settings.MAX_REQUEST_SIZE_MB * MB,
        max_upload_bytes=settings.MAX_UPLOAD_SIZE_MB * MB,
        timeout_seconds=settings.REQUEST_TIMEOUT_SECONDS,
    )
    # Unhandled exceptions become the envelope here, inside the layers above.
    app.add_middleware(ErrorHandlerMiddleware)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.TRUSTED_HOSTS)
    if settings.ENABLE_SECURITY_HEADERS:
        app.add_middleware(
            SecurityHeadersMiddleware,
            trusted_proxies=trusted,
            production=settings.ENVIRONMENT == "production",
        )


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
    app = FastAPI(
        title=settings.APP_NAME,
        version=settings.APP_VERSION,
        debug=False,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tracing = Tracing(settings, span_exporter)
    app.state.metrics = MetricsCollector()
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(users_router)
    app.include_router(files_router)
    app.include_router(pipeline_router)
    if settings.ADMIN_DIAGNOSTICS_ENABLED:
        app.include_router(admin_router)
    if settings.ENVIRONMENT == "test":
        from backend.api.debug import router as debug_router

        app.include_router(debug_router)
    add_hardening_middleware(app, settings)
    if settings.CORS_ORIGINS:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.CORS_ORIGINS,
            allow_credentials=True,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            # Hardening: let browser clients read the rate-limit state and Retry-After.
            expose_headers=[
                "X-Request-ID",
                "Server-Timing",
                "Retry-After",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
                "RateLimit",
                "RateLimit-Policy",
            ],
        )
    # Everything added with add_middleware above (hardening layers, CORS) runs inside
    # the two layers below.
    #
    # The two outermost layers, outermost first (ARCHITECTURE.md "The path of a request"):
    #   1. the OpenTelemetry server span (so a 500 from the catch-all handler is an error span)
    #   2. the request context (request id, log context, Server-Timing, the access line),
    #      which also stamps the final 500 rendered by Starlette's ServerErrorMiddleware
    instrument_app(app)
    install_request_context(app, settings)
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
