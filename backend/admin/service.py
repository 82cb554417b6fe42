"""Operator work: database diagnostics, and pipeline runs executed in the operator's process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from backend.config import Settings
from backend.database import Database, engine_options
from backend.errors import NotFound
from backend.migrations.runner import current_revisions, head_revisions
from backend.models import PipelineRun, User
from backend.observability.redaction import redact_text
from backend.pipeline.engine import PhaseProgress
from backend.pipeline.executor import Outcome
from backend.storage import Storage

# Local files are read in pieces of this size on their way into storage.
READ_CHUNK = 1024 * 1024


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
        # Through the one redaction: userinfo and ?password= both masked.
        url=redact_text(url.render_as_string(hide_password=False)),
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


# ------------------------------------------------------------------ pipeline runs


class RunWatcher(Protocol):
    """Follows a run executed by `execute_here` (the CLI's progress display)."""

    def queued(self, run_id: uuid.UUID, input_path: str, size: int) -> None:
        """The run is queued for `input_path`, a stored tape of `size` bytes."""

    def phase(self, progress: PhaseProgress) -> None:
        """A phase moved on (the engine's progress callback)."""


@dataclass(frozen=True, slots=True)
class HereRun:
    """How a run executed by `execute_here` ended: the row as the executor left it,
    the rows it stored, and the execution's own outcome."""

    run: PipelineRun
    outcome: Outcome
    facts: int
    exceptions: int
    uploaded: bool


async def _read_local(source: Path) -> AsyncIterator[bytes]:
    with source.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, READ_CHUNK):
            yield chunk


async def stage_tape(
    storage: Storage, user: User | None, source: Path, *, overwrite: bool, max_upload_mb: int
) -> str:
    """Store the local tape `source` in `user`'s scope under `inputs/` (no user: straight
    under `inputs/`, admins only) with the upload's checks (name, CSV content, size);
    returns its storage path. A taken name is a Conflict unless `overwrite`."""
    from backend.files.service import store_upload

    path, _size, _sha256 = await store_upload(
        storage,
        user,
        source.name,
        _read_local(source),
        overwrite=overwrite,
        max_upload_mb=max_upload_mb,
    )
    return path


async def execute_here(
    settings: Settings,
    tape: Path | str,
    *,
    username: str | None = None,
    overwrite: bool = False,
    watcher: RunWatcher | None = None,
) -> HereRun:
    """Queue a run of `tape` as the API does, and execute it in this process.

    `tape` is a local file (a Path: stored under `inputs/` first) or a storage
    path (`inputs/...`). The run is created by `create_run` (queue bound, trace
    seed linking to the current span), queued for an executor of this process
    and executed by `RunExecutor` under a renewed lease, in its own trace, like
    the in-process runner's runs. `username` names the account the run is
    recorded for (NotFound if there is none; None: no account).

    Domain errors before the run exists (bad path, no such tape, upload refused,
    queue full) are raised as AppError; the run's own failure is not an error
    here but the returned row's status. If this process is stopped mid-run, the
    run is handed back: its lease ends and the service's recovery re-queues it.
    """
    from backend.observability.instrumentation import instrument_engine
    from backend.pipeline import telemetry
    from backend.pipeline.engine import PipelineEngine
    from backend.pipeline.executor import LeaseKeeper, RunExecutor
    from backend.pipeline.leases import Leases
    from backend.pipeline.service import create_run, stored_rows
    from backend.storage import create_storage

    database = Database(settings)
    instrument_engine(database.engine)
    storage = create_storage(settings)
    try:
        user = None
        if username is not None:
            async with database.session() as session:
                user = await session.scalar(select(User).where(User.username == username))
            if user is None:
                raise NotFound(f"No user named {username!r}")
        uploaded = isinstance(tape, Path)
        if isinstance(tape, Path):
            input_path = await stage_tape(
                storage, user, tape, overwrite=overwrite, max_upload_mb=settings.MAX_UPLOAD_SIZE_MB
            )
        else:
            input_path = tape
        leases = Leases(database, settings.PIPELINE_LEASE_SECONDS)
        # The run's trace links back to the current span (the CLI command's), as to a request's.
        seed = telemetry.seed_from_request()
        async with database.session() as session:
            run = await create_run(
                session,
                storage,
                user,
                input_path,
                leases=leases,
                owner=leases.owner,
                max_queued=settings.PIPELINE_MAX_QUEUED_RUNS,
                seed=seed,
            )
            run_id = run.id
            input_path = run.input_path
        telemetry.mark_request(run_id, seed)
        if watcher is not None:
            watcher.queued(run_id, input_path, (await storage.stat(input_path)).size)
        engine = PipelineEngine(
            database, storage, settings, progress=watcher.phase if watcher else None
        )
        keeper = LeaseKeeper(leases)
        executor = RunExecutor(database, storage, settings, leases, keeper, engine=engine)
        keeper.start()
        try:
            outcome = await executor.execute(run_id)
        finally:
            await keeper.stop()
        async with database.session() as session:
            row = await session.get(PipelineRun, run_id)
            assert row is not None  # created above; runs are never deleted
            facts, exceptions = await stored_rows(session, run_id)
        return HereRun(row, outcome, facts, exceptions, uploaded)
    finally:
        await storage.close()
        await database.dispose()
