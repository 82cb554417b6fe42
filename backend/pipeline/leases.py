"""Run ownership: which process executes a run, until when, and the writes it may make.

A run row names its `owner` (one executor: `host:pid:random`) and holds a lease
until `lease_expires_at`. The owner renews the lease (`renew`) while it holds
the run; every status write after the claim is conditional on still being the
owner, so a process that lost its lease (paused, cut off from the database,
presumed dead) can never overwrite the work of the process that took over.

Lifecycle of a run row:

    queued  --claim-->  running  --complete / fail-->  completed / failed
      ^                   |
      +---- requeue ------+   (lease expired: owner dead or silent; hand_back)

- `claim`: queued -> running, by one executor only; counts an attempt.
- `recover_expired`: runs whose lease ran out go back to the queue, or to
  `failed` once PIPELINE_MAX_ATTEMPTS executions have started. Runs with a live
  lease are never touched, whoever holds them.
- A queued run waiting in a broker has no lease (NULL) and is never recovered:
  the broker holds it. While it is being handed to the broker it has a short
  one, so a process that dies between the commit and the publish leaves a run
  that the next recovery publishes again.

Time comes from the database clock on PostgreSQL, so hosts with drifting
clocks still agree on when a lease expires; SQLite (one host) uses this
process's clock.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, delete, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.database import Database
from backend.models import LoanException, LoanFact, PipelineRun, RunStatus

ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)


def new_owner_id() -> str:
    """An owner id unique to one executor: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def gave_up_message(attempts: int) -> str:
    return (
        f"The run was stopped {attempts} times before it could finish (its process "
        "stopped or lost contact with the database); it was not started again"
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """What an executor needs once it owns a run."""

    run_id: uuid.UUID
    input_path: str
    attempt: int
    trace_id: str | None
    request_traceparent: str | None
    queued_at: datetime | None
    started_at: datetime
    # Where the run's reports go: set when it was queued (in its owner's storage scope).
    output_prefix: str


@dataclass(frozen=True, slots=True)
class Recovered:
    """The outcome of one recovery pass."""

    requeued: list[uuid.UUID]
    failed: list[uuid.UUID]


class Leases:
    """The ownership writes of one executor (`owner`) on one database."""

    def __init__(self, database: Database, lease_seconds: float, owner: str | None = None) -> None:
        self.database = database
        self.lease_seconds = lease_seconds
        self.owner = owner or new_owner_id()
        self._postgres = database.engine.dialect.name == "postgresql"

    # ------------------------------------------------------------------ clock

    def now(self) -> Any:
        """The current time as the database sees it (an SQL expression on PostgreSQL)."""
        if self._postgres:
            return func.clock_timestamp(type_=DateTime(timezone=True))
        return literal(datetime.now(UTC), DateTime(timezone=True))

    def expiry(self, seconds: float | None = None) -> Any:
        """When a lease taken now ends."""
        length = timedelta(seconds=self.lease_seconds if seconds is None else seconds)
        if self._postgres:
            return func.clock_timestamp(type_=DateTime(timezone=True)) + length
        return literal(datetime.now(UTC) + length, DateTime(timezone=True))

    # ----------------------------------------------------------------- writes

    async def claim(self, run_id: uuid.UUID, output_prefix: str) -> Claim | None:
        """Take a queued run (unowned, or queued for this executor): None when it is
        not queued any more (finished, or running elsewhere) or held by another.

        `output_prefix` applies only to a run queued without one (before runs were
        scoped); a run's own prefix is kept, so its reports stay in its owner's scope.
        """
        now = self.now()
        statement = (
            update(PipelineRun)
            .execution_options(synchronize_session=False)
            .where(
                PipelineRun.id == run_id,
                PipelineRun.status == RunStatus.QUEUED,
                (PipelineRun.owner.is_(None)) | (PipelineRun.owner == self.owner),
            )
            .values(
                status=RunStatus.RUNNING,
                owner=self.owner,
                lease_expires_at=self.expiry(),
                attempts=PipelineRun.attempts + 1,
                started_at=now,
                finished_at=None,
                error_message=None,
                output_prefix=func.coalesce(PipelineRun.output_prefix, output_prefix),
            )
            .returning(
                PipelineRun.input_path,
                PipelineRun.output_prefix,
                PipelineRun.attempts,
                PipelineRun.trace_id,
                PipelineRun.request_traceparent,
                PipelineRun.queued_at,
                PipelineRun.started_at,
            )
        )
        async with self.database.session() as session:
            row = (await session.execute(statement)).one_or_none()
        if row is None:
            return None
        return Claim(
            run_id=run_id,
            input_path=row.input_path,
            attempt=row.attempts,
            trace_id=row.trace_id,
            request_traceparent=row.request_traceparent,
            queued_at=_aware(row.queued_at),
            started_at=_aware(row.started_at) or datetime.now(UTC),
            output_prefix=row.output_prefix or output_prefix,
        )

    async def describe(self, run_id: uuid.UUID) -> tuple[str | None, str | None]:
        """(status, owner) of a run, for logging why a claim found nothing to do."""
        async with self.database.session() as session:
            row = (
                await session.execute(
                    select(PipelineRun.status, PipelineRun.owner).where(PipelineRun.id == run_id)
                )
            ).one_or_none()
        if row is None:
            return None, None
        return RunStatus(row.status).value, row.owner

    async def renew(self, run_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Extend the lease of each run still owned here; returns those (the rest are lost)."""
        ids = list(run_ids)
        if not ids:
            return set()
        statement = (
            update(PipelineRun)
            .execution_options(synchronize_session=False)
            .where(
                PipelineRun.id.in_(ids),
                PipelineRun.owner == self.owner,
                PipelineRun.status.in_(ACTIVE),
            )
            .values(lease_expires_at=self.expiry())
            .returning(PipelineRun.id)
        )
        async with self.database.session() as session:
            return set((await session.scalars(statement)).all())

    async def complete(self, run_id: uuid.UUID, values: dict[str, Any]) -> bool:
        """Record success (`values`: counts, durations) if this executor still owns the run."""
        return await self._update(
            *self._mine(run_id),
            status=RunStatus.COMPLETED,
            finished_at=self.now(),
            lease_expires_at=None,
            error_message=None,
            **values,
        )

    async def fail(self, run_id: uuid.UUID, status: RunStatus, message: str) -> bool:
        """Record an unsuccessful end and remove the run's rows, in one transaction,
        if this executor still owns the run; False (nothing written) otherwise."""
        statement = (
            update(PipelineRun)
            .execution_options(synchronize_session=False)
            .where(*self._mine(run_id))
            .values(
                status=status,
                finished_at=self.now(),
                lease_expires_at=None,
                error_message=message[:1000],
            )
        )
        async with self.database.session() as session:
            if not _changed(await session.execute(statement)):
                return False
            await _delete_rows(session, [run_id])
        return True

    async def hand_back(self, run_id: uuid.UUID, *, requeue_now: bool) -> bool:
        """Give a run this executor holds back to the queue (shutdown).

        `requeue_now`: it goes back to `queued` for anyone (the caller publishes it
        again, with a short lease as the publish deadline); otherwise it is queued
        with its lease ended, and the next recovery pass, in any live process,
        takes it.
        """
        values: dict[str, Any]
        if requeue_now:
            values = {
                "status": RunStatus.QUEUED,
                "owner": None,
                "lease_expires_at": self.expiry(),
                "queued_at": self.now(),
            }
        else:
            # Still named as its last owner (for the record), but claimable by nobody
            # until recovery queues it for a live process.
            values = {
                "status": RunStatus.QUEUED,
                "lease_expires_at": self.now(),
                "queued_at": self.now(),
            }
        return await self._update(
            PipelineRun.id == run_id,
            PipelineRun.owner == self.owner,
            PipelineRun.status.in_(ACTIVE),
            **values,
        )

    async def published(self, run_id: uuid.UUID) -> None:
        """The broker has the run: drop its publish deadline (the broker holds it now)."""
        await self._update(
            PipelineRun.id == run_id,
            PipelineRun.status == RunStatus.QUEUED,
            PipelineRun.owner.is_(None),
            lease_expires_at=None,
        )

    async def recover_expired(self, max_attempts: int, *, new_owner: str | None) -> Recovered:
        """Re-queue every active run whose lease has expired, or fail it when it has
        used up `max_attempts` executions.

        Re-queued runs are queued for `new_owner` (an in-process executor, with a
        fresh lease) or for anyone (None: the caller publishes them, with a short
        lease as the publish deadline). Concurrent passes in several processes
        are safe: each run is taken by exactly one of them.
        """
        expired = (
            PipelineRun.status.in_(ACTIVE),
            PipelineRun.lease_expires_at.is_not(None),
            PipelineRun.lease_expires_at < self.now(),
        )
        async with self.database.session() as session:
            gave_up = (
                (
                    await session.execute(
                        update(PipelineRun)
                        .execution_options(synchronize_session=False)
                        .where(*expired, PipelineRun.attempts >= max_attempts)
                        .values(
                            status=RunStatus.FAILED,
                            finished_at=self.now(),
                            lease_expires_at=None,
                            owner=None,
                            error_message=gave_up_message(max_attempts),
                        )
                        .returning(PipelineRun.id)
                    )
                )
                .scalars()
                .all()
            )
            if gave_up:
                await _delete_rows(session, list(gave_up))
            requeued = (
                await session.scalars(
                    update(PipelineRun)
                    .execution_options(synchronize_session=False)
                    .where(*expired)
                    .values(
                        status=RunStatus.QUEUED,
                        owner=new_owner,
                        lease_expires_at=self.expiry(),
                        queued_at=self.now(),
                    )
                    .returning(PipelineRun.id)
                )
            ).all()
        return Recovered(requeued=list(requeued), failed=list(gave_up))

    async def count_queued(self) -> int:
        """Runs waiting to start, over all processes."""
        async with self.database.session() as session:
            query = select(func.count()).select_from(PipelineRun)
            queued = query.where(PipelineRun.status == RunStatus.QUEUED)
            return int(await session.scalar(queued) or 0)

    async def withdraw(self, run_id: uuid.UUID) -> None:
        """Delete a queued run nobody can execute (its publish failed): as if never made."""
        async with self.database.session() as session:
            await session.execute(
                delete(PipelineRun).where(
                    PipelineRun.id == run_id, PipelineRun.status == RunStatus.QUEUED
                )
            )

    async def _update(self, *where: Any, **values: Any) -> bool:
        """One conditional UPDATE of pipeline_runs in its own transaction; True if it hit."""
        statement = (
            update(PipelineRun)
            .execution_options(synchronize_session=False)
            .where(*where)
            .values(**values)
        )
        async with self.database.session() as session:
            return _changed(await session.execute(statement))

    def _mine(self, run_id: uuid.UUID) -> tuple[Any, ...]:
        return (
            PipelineRun.id == run_id,
            PipelineRun.owner == self.owner,
            PipelineRun.status == RunStatus.RUNNING,
        )


async def _delete_rows(session: AsyncSession, run_ids: list[uuid.UUID]) -> None:
    await session.execute(delete(LoanFact).where(LoanFact.run_id.in_(run_ids)))
    await session.execute(delete(LoanException).where(LoanException.run_id.in_(run_ids)))


def _changed(result: Any) -> bool:
    return bool(getattr(result, "rowcount", 0))


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
