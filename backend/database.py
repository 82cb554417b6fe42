"""Async engine and session factory.

PostgreSQL (asyncpg) gets the pool settings from `Settings`; the embedded SQLite
default (aiosqlite) gets a plain pool with foreign keys switched on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from backend.config import Settings


def engine_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `create_async_engine` under these settings."""
    options: dict[str, Any] = {"echo": settings.DB_ECHO_QUERIES, "pool_pre_ping": True}
    if not settings.is_sqlite:
        options.update(
            pool_size=settings.DB_POOL_SIZE,
            max_overflow=settings.DB_MAX_OVERFLOW,
            pool_recycle=settings.DB_POOL_RECYCLE,
            pool_timeout=settings.DB_POOL_TIMEOUT,
            connect_args={
                "server_settings": {"application_name": "loan-engine"},
                # Bound connection set-up so a dead database fails fast instead of hanging.
                "timeout": min(settings.DB_POOL_TIMEOUT, 10),
            },
        )
    return options


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

    return engine


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


class Database:
    """One engine and its session factory, owned by the application."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = create_engine(settings)
        self.session_factory = create_session_factory(self.engine)

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
