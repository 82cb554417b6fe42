"""Async engine and session factory.

PostgreSQL (asyncpg) gets the pool settings from `Settings`; the embedded SQLite
default (aiosqlite) gets a plain pool with foreign keys switched on.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from opentelemetry import trace
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from backend.config import Settings
from backend.errors import is_database_unavailable
from backend.observability import metrics as app_metrics
from backend.observability.logging_config import format_trace_ids
from backend.resilience import CircuitBreaker

SLOW_QUERY_STATEMENT_CHARS = 1000
# Attribute on SQLAlchemy's per-execution context; the execution context is discarded
# with the statement, so nothing is left behind when a statement fails.
_START_ATTR = "_loan_engine_started"


def engine_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `create_async_engine` under these settings.

    Statement values never appear in SQLAlchemy's error text or statement log
    (`hide_parameters`). DB_ECHO_QUERIES is not `echo=True` (whose own stdout handler
    prints plain-text duplicates): logging_config sets `sqlalchemy.engine` to INFO,
    so statements come out as JSON lines through the one handler.
    """
    options: dict[str, Any] = {"hide_parameters": True, "pool_pre_ping": True}
    if not settings.is_sqlite:
        options.update(
            pool_size=settings.DB_POOL_SIZE,
            max_overflow=settings.DB_MAX_OVERFLOW,
            pool_recycle=settings.DB_POOL_RECYCLE,
            pool_timeout=settings.DB_POOL_TIMEOUT,
            connect_args={
                "server_settings": server_settings(settings),
                # A database that accepts and never answers must fail in seconds: the
                # connect, and every statement on a pooled connection (pre-ping included).
                "timeout": settings.DB_CONNECT_TIMEOUT_SECONDS,
                "command_timeout": settings.DB_COMMAND_TIMEOUT_SECONDS,
            },
        )
    return options


def server_settings(settings: Settings) -> dict[str, str]:
    """Session settings PostgreSQL applies to every connection of the pool."""
    values = {"application_name": "loan-engine"}
    if settings.DB_STATEMENT_TIMEOUT_MS:
        values["statement_timeout"] = str(settings.DB_STATEMENT_TIMEOUT_MS)
    return values


def ensure_sqlite_dir(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def create_engine(settings: Settings) -> AsyncEngine:
    """Build the async engine for `settings.DATABASE_URL`."""
    if settings.is_sqlite:
        ensure_sqlite_dir(settings.DATABASE_URL)
    engine = create_async_engine(settings.DATABASE_URL, **engine_options(settings))
    if settings.is_sqlite:

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

    install_slow_query_listener(engine, settings.DB_SLOW_QUERY_MS)
    return engine


def install_slow_query_listener(engine: AsyncEngine, threshold_ms: int) -> None:
    """Report statements slower than `threshold_ms` on their span and in the log.

    The report is a `db.slow_query` span event and a `db.slow_query` warning with
    the statement text cut to 1,000 characters (never its parameters), the
    duration and the threshold. Install before the SQLAlchemy instrumentation:
    listeners run in registration order, and the statement's span must still be
    open when the event is added.
    """
    log = structlog.get_logger("backend.database")
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _started(
        _conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        if context is not None:
            setattr(context, _START_ATTR, time.perf_counter())

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _finished(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        started = getattr(context, _START_ATTR, None)
        if started is None:
            return
        duration_ms = (time.perf_counter() - started) * 1000
        if duration_ms <= threshold_ms:
            return
        fields: dict[str, Any] = {
            "statement": statement[:SLOW_QUERY_STATEMENT_CHARS],
            "duration_ms": round(duration_ms, 2),
            "threshold_ms": threshold_ms,
        }
        # The statement's own span (set by the SQLAlchemy instrumentation, not made
        # current by it); the request's span when the engine is not instrumented.
        span = getattr(context, "_otel_span", None) or trace.get_current_span()
        span.add_event("db.slow_query", fields)
        span_context = span.get_span_context()
        if span_context.is_valid:
            # The statement span's ids (a log line would otherwise carry the request's).
            fields.update(format_trace_ids(span_context.trace_id, span_context.span_id))
        log.warning("db.slow_query", **fields)
        app_metrics.slow_queries.add(1)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


class Database:
    """One engine and its session factory, owned by the application."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_engine(settings)
        self.session_factory = create_session_factory(self.engine)
        self.breaker = CircuitBreaker(
            "database", settings.CIRCUIT_FAILURE_THRESHOLD, settings.CIRCUIT_RECOVERY_SECONDS
        )

    @asynccontextmanager
    async def request_session(self) -> AsyncIterator[AsyncSession]:
        """`session()` behind the database breaker: refused at once (CircuitOpen, 503)
        while it is open; an unreachable database counts against it, anything else
        the route raises (a 404, a conflict) does not."""
        with self.breaker.guard(is_database_unavailable):
            async with self.session() as session:
                yield session

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session that commits when the caller is done and rolls back on error."""
        async with self.session_factory() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def dispose(self) -> None:
        await self.engine.dispose()
