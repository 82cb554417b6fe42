"""The application factory and the ASGI app object (`backend.api.main:app`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy.exc import SQLAlchemyError

from backend.auth.routes import router as auth_router
from backend.config import Settings, get_settings
from backend.database import Database
from backend.errors import install_error_handlers
from backend.files.routes import router as files_router
from backend.observability.health import router as health_router
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
    database = Database(settings)
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


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build a fully wired application for `settings` (the process settings by default)."""
    settings = settings or get_settings()
    app = FastAPI(
        title=settings.APP_NAME,
        version=settings.APP_VERSION,
        debug=False,
        lifespan=lifespan,
    )
    app.state.settings = settings
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
    return app


def __getattr__(name: str) -> FastAPI:
    # `uvicorn backend.api.main:app` builds the app on first access, so importing this
    # module (tests, the CLI) never reads the environment or touches the database.
    if name == "app":
        application = create_app()
        globals()["app"] = application
        return application
    raise AttributeError(name)
