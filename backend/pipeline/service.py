"""Creating runs and reading runs, facts and exceptions (all SQL of the pipeline API).

Every read goes through `readable_runs(user)`: the one place runs, and the facts
and exceptions that hang off them, are scoped by the caller (backend/scoping.py).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, func, insert, or_, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from backend.errors import AppError, BadRequest, NotFound
from backend.files.service import readable_path
from backend.models import (
    LoanException,
    LoanFact,
    PipelineRun,
    RunStatus,
    Severity,
    User,
)
from backend.pagination import PageParams
from backend.pipeline.leases import Leases
from backend.pipeline.telemetry import RunTraceSeed
from backend.scoping import creation_scope, is_unscoped_reader
from backend.storage import Storage, parse_path


class RunNotFound(NotFound):
    code, message = "run_not_found", "Pipeline run not found"


def readable_by(user: User) -> ColumnElement[bool]:
    """The condition on `PipelineRun` that `user` may read the run (backend/scoping.py):
    admins everything; others their team's runs and those they queued with no team."""
    if is_unscoped_reader(user):
        return true()
    personal = and_(PipelineRun.sales_team_id.is_(None), PipelineRun.created_by == user.id)
    if user.sales_team_id is None:
        return personal
    return or_(PipelineRun.sales_team_id == user.sales_team_id, personal)


def readable_runs(user: User) -> Select[PipelineRun]:
    """The runs `user` may read; every read of runs, facts and exceptions starts here."""
    return select(PipelineRun).where(readable_by(user))


# Serializes "count the queue, then add to it" across every process (PostgreSQL).
SUBMIT_LOCK_KEY = 0x4C4F414E5F5155  # "LOAN_QU"
QUEUE_FULL_RETRY_AFTER_SECONDS = 30


class QueueFull(AppError):
    status_code, code = 429, "pipeline_queue_full"
    message = "Too many pipeline runs are waiting to start; try again later"


async def create_run(
    session: AsyncSession,
    storage: Storage,
    user: User | None,
    input_path: str,
    *,
    leases: Leases,
    owner: str | None,
    max_queued: int,
    seed: RunTraceSeed | None = None,
) -> PipelineRun:
    """A committed `queued` run for an existing tape under `inputs/`, started by
    `user` (None: by an operator on the command line, as no account).

    Refused with QueueFull (nothing written) when `max_queued` runs already
    wait, counted over every process. The run is queued for `owner` with a
    lease (the in-process runner), or for anyone (None) with a short lease that
    stands until the broker has it. `seed` gives its planned trace id and the
    request it links back to.

    Committed here, not at the request boundary, because an executor reads the
    row from its own session as soon as the run is dispatched.
    """
    checked = parse_path(input_path)
    if checked.area != "inputs":
        raise BadRequest("input_path must be a file under inputs/")
    # A tape the caller may not read is a 404, exactly like a missing one.
    if user is not None:
        readable_path(user, str(checked))
    await storage.stat(str(checked))  # 404 now rather than a failed run later
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(SUBMIT_LOCK_KEY)))
    waiting = await session.scalar(
        select(func.count()).select_from(PipelineRun).where(PipelineRun.status == RunStatus.QUEUED)
    )
    if (waiting or 0) >= max_queued:
        await session.rollback()
        raise QueueFull(
            details={"queued_runs": waiting, "max_queued_runs": max_queued},
            headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_SECONDS)},
        )
    run_id = uuid.uuid4()
    run: PipelineRun | None = await session.scalar(
        insert(PipelineRun)
        .values(
            id=run_id,
            status=RunStatus.QUEUED,
            input_path=str(checked),
            # Owned by the caller and their team as of now; the reports go to that
            # scope in storage, so they are readable by exactly who reads the run.
            # An operator's run (no account) is unscoped: admins read it.
            created_by=user.id if user is not None else None,
            sales_team_id=user.sales_team_id if user is not None else None,
            output_prefix=(
                f"outputs/{creation_scope(user)}/{run_id}/"
                if user is not None
                else f"outputs/{run_id}/"
            ),
            phase_durations={},
            trace_id=seed.trace_id_hex if seed is not None else None,
            request_traceparent=seed.traceparent if seed is not None else None,
            owner=owner,
            lease_expires_at=leases.expiry(),
            queued_at=leases.now(),
        )
        .returning(PipelineRun)
    )
    assert run is not None
    await session.commit()
    return run


async def _page(
    session: AsyncSession, query: Select[Any], page: PageParams, *order: Any
) -> tuple[list[Any], int]:
    total = await session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = await session.scalars(query.order_by(*order).limit(page.limit).offset(page.offset))
    return list(rows), total


async def list_runs(
    session: AsyncSession, user: User, page: PageParams, status: RunStatus | None
) -> tuple[list[PipelineRun], int]:
    """One page of the runs `user` reads, newest first, and how many there are."""
    query = readable_runs(user)
    if status is not None:
        query = query.where(PipelineRun.status == status)
    return await _page(session, query, page, PipelineRun.created_at.desc(), PipelineRun.id)


async def get_run(session: AsyncSession, user: User, run_id: uuid.UUID) -> PipelineRun:
    """The run when `user` may read it; RunNotFound whether it is missing or not theirs."""
    run = await session.scalar(readable_runs(user).where(PipelineRun.id == run_id))
    if run is None:
        raise RunNotFound()
    return run


async def list_exceptions(
    session: AsyncSession,
    user: User,
    run_id: uuid.UUID,
    page: PageParams,
    rule: str | None,
    severity: Severity | None,
) -> tuple[list[LoanException], int]:
    """One page of a readable run's exceptions; RunNotFound as in `get_run`."""
    await get_run(session, user, run_id)
    query = select(LoanException).where(LoanException.run_id == run_id)
    if rule is not None:
        query = query.where(LoanException.rule_id == rule)
    if severity is not None:
        query = query.where(LoanException.severity == severity)
    return await _page(session, query, page, LoanException.seq)


async def list_facts(
    session: AsyncSession,
    user: User,
    run_id: uuid.UUID,
    page: PageParams,
    eligible: bool | None,
) -> tuple[list[LoanFact], int]:
    """One page of a readable run's facts; RunNotFound as in `get_run`."""
    await get_run(session, user, run_id)
    query = select(LoanFact).where(LoanFact.run_id == run_id)
    if eligible is not None:
        query = query.where(LoanFact.eligible == eligible)
    return await _page(session, query, page, LoanFact.row_number)


async def stored_rows(session: AsyncSession, run_id: uuid.UUID) -> tuple[int, int]:
    """(loan facts, exceptions) stored for the run: what its /facts and /exceptions list."""
    facts = await session.scalar(
        select(func.count()).select_from(LoanFact).where(LoanFact.run_id == run_id)
    )
    exceptions = await session.scalar(
        select(func.count()).select_from(LoanException).where(LoanException.run_id == run_id)
    )
    return facts or 0, exceptions or 0


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """What the operator's `run-stats` shows: counts by status, totals, the latest runs."""

    by_status: dict[str, int]
    total_runs: int
    total_loans: int
    eligible_loans: int
    exception_count: int
    recent: list[PipelineRun] = field(default_factory=list)


async def run_statistics(session: AsyncSession, *, recent: int = 10) -> RunStatistics:
    """Counts of runs by status (every status listed, zero included), the sums of
    loans, eligible loans and exceptions over all runs, and the `recent` newest runs."""
    counted = await session.execute(
        select(PipelineRun.status, func.count()).group_by(PipelineRun.status)
    )
    by_status = {status.value: 0 for status in RunStatus}
    for status, count in counted.all():
        by_status[RunStatus(status).value] = count
    totals = (
        await session.execute(
            select(
                func.coalesce(func.sum(PipelineRun.total_loans), 0),
                func.coalesce(func.sum(PipelineRun.eligible_loans), 0),
                func.coalesce(func.sum(PipelineRun.exception_count), 0),
            )
        )
    ).one()
    latest = await session.scalars(
        select(PipelineRun)
        .order_by(PipelineRun.created_at.desc(), PipelineRun.id)
        .limit(max(recent, 0))
    )
    return RunStatistics(
        by_status=by_status,
        total_runs=sum(by_status.values()),
        total_loans=int(totals[0]),
        eligible_loans=int(totals[1]),
        exception_count=int(totals[2]),
        recent=list(latest),
    )
