"""The application factory and the ASGI app object (`backend.api.main:app`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.sdk.trace.export import SpanExporter
from sqlalchemy.exc import SQLAlchemyError

from backend.auth.routes import router as auth_router
from backend.config import Settings, get_settings
from backend.database import Database
from backend.errors import install_error_handlers
from backend.files.routes import router as files_router
from backend.middleware.request_context import install_request_context
from backend.observability.health import router as health_router
from backend.observability.logging_config import (
    configure_logging,
    replay_warnings,
    warnings_held_for_logging,
)
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
    except SQLAlchemyError as exc:
        logger.warning("admin.seed.skipped", reason=type(exc).__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # Tracing starts here, in each worker process (never before a fork): the exporter
    # thread and service.instance.id belong to the worker.
    tracing: Tracing = app.state.tracing
    tracing.start()
    database = Database(settings)
    instrument_engine(database.engine)
    app.state.db = database
    storage = create_storage(settings)
    app.state.storage = storage
    runner = PipelineRunner(database, storage, settings)
    app.state.runner = runner
    await seed_admin(database, settings)
    await runner.recover()
    logger.info("app.started", environment=settings.ENVIRONMENT, version=settings.APP_VERSION)
    try:
        yield
    finally:
        # Runs need the database and storage: drain them before either goes away.
        await runner.shutdown(settings.PIPELINE_DRAIN_SECONDS)
        await storage.close()
        await database.dispose()
        logger.info("app.stopped")
        # Last, so spans of the shutdown itself are exported; bounded, never hangs.
        tracing.shutdown()


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
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(users_router)
    app.include_router(files_router)
    app.include_router(pipeline_router)
    if settings.CORS_ORIGINS:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.CORS_ORIGINS,
            allow_credentials=True,
            allow_methods=["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Server-Timing"],
        )
    # Security headers, body limits and rate limiting: add them here with add_middleware
    # (Starlette runs the one added last outermost, so rate limit first, security headers
    # last). Everything added with add_middleware runs inside the two layers below.
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
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
