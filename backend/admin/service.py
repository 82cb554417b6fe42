"""Operator diagnostics: is the database there, how fast, and is its schema current."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from backend.config import Settings
from backend.database import Database, engine_options
from backend.migrations.runner import current_revisions, head_revisions
from backend.observability.logging_config import redact_text


@dataclass(frozen=True, slots=True)
class DatabaseStatus:
    """One probe of the configured database.

    `reachable` is false when connecting or `SELECT 1` failed or took longer than
    the probe's timeout; `error` then says why in one line (credentials removed),
    and the fields that need a connection are None or empty.
    """

    url: str
    dialect: str
    driver: str
    reachable: bool
    error: str | None = None
    latency_ms: float | None = None
    server_version: str | None = None
    current_revisions: tuple[str, ...] = ()
    head_revisions: tuple[str, ...] = ()
    pool: dict[str, Any] = field(default_factory=dict)

    @property
    def at_head(self) -> bool:
        """The database is stamped with exactly the scripts' head revision(s)."""
        return self.reachable and set(self.current_revisions) == set(self.head_revisions)

    @property
    def healthy(self) -> bool:
        return self.reachable and self.at_head


def pool_settings(settings: Settings) -> dict[str, Any]:
    """The pool configuration the application's engine is built with."""
    options = engine_options(settings)
    if settings.is_sqlite:
        return {"class": "default (SQLite)", "pre_ping": options["pool_pre_ping"]}
    return {
        "class": "QueuePool",
        "size": options["pool_size"],
        "max_overflow": options["max_overflow"],
        "timeout_seconds": options["pool_timeout"],
        "recycle_seconds": options["pool_recycle"],
        "pre_ping": options["pool_pre_ping"],
    }


async def database_status(settings: Settings, *, limit_seconds: float = 10.0) -> DatabaseStatus:
    """Probe the database of `settings` through an engine built like the application's.

    Never raises for an unreachable or slow database: the answer says so. The
    whole probe (connect, `SELECT 1`, reading the Alembic stamp) is bounded by
    `limit_seconds`.
    """
    url = make_url(settings.DATABASE_URL)
    base = DatabaseStatus(
        url=url.render_as_string(hide_password=True),
        dialect=url.get_backend_name(),
        driver=url.get_driver_name(),
        reachable=False,
        head_revisions=head_revisions(),
        pool=pool_settings(settings),
    )
    database = Database(settings)
    try:
        async with asyncio.timeout(limit_seconds):
            return await _probe(database, base)
    except TimeoutError:
        return replace(base, error=f"no answer within {limit_seconds:g} s")
    except Exception as exc:  # any driver or network error means "not reachable"
        return replace(base, error=redact_text(f"{type(exc).__name__}: {exc}".splitlines()[0]))
    finally:
        await database.dispose()


async def _probe(database: Database, base: DatabaseStatus) -> DatabaseStatus:
    async with database.engine.connect() as conn:
        started = time.perf_counter()
        await conn.execute(text("SELECT 1"))
        latency_ms = (time.perf_counter() - started) * 1000
        version = conn.dialect.server_version_info or ()
        current = await conn.run_sync(current_revisions)
    return replace(
        base,
        reachable=True,
        latency_ms=round(latency_ms, 2),
        server_version=".".join(str(part) for part in version) or None,
        current_revisions=current,
    )
