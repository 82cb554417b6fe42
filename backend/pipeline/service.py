"""Creating runs and reading runs, facts and exceptions (all SQL of the pipeline API)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.errors import BadRequest, NotFound
from backend.models import (
    LoanException,
    LoanFact,
    PipelineRun,
    RunStatus,
    Severity,
    User,
)
from backend.pagination import PageParams
from backend.storage import Storage, parse_path


class RunNotFound(NotFound):
    code, message = "run_not_found", "Pipeline run not found"


async def create_run(
    session: AsyncSession,
    storage: Storage,
    user: User,
    input_path: str,
    trace_id: str | None = None,
) -> PipelineRun:
    """A committed `queued` run for an existing tape under `inputs/`.

    `trace_id` is the run's planned trace id (32 hex), when known in advance.

    Committed here, not at the request boundary, because the runner reads the
    row from its own session as soon as the run is submitted.
    """
    checked = parse_path(input_path)
    if checked.area != "inputs":
        raise BadRequest("input_path must be a file under inputs/")
    await storage.stat(str(checked))  # 404 now rather than a failed run later
    run = PipelineRun(
        id=uuid.uuid4(),
        status=RunStatus.QUEUED,
        input_path=str(checked),
        created_by=user.id,
        phase_durations={},
        trace_id=trace_id,
    )
    session.add(run)
    await session.commit()
    return run


async def _page(
    session: AsyncSession, query: Select[Any], page: PageParams, *order: Any
) -> tuple[list[Any], int]:
    total = await session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = await session.scalars(query.order_by(*order).limit(page.limit).offset(page.offset))
    return list(rows), total


async def list_runs(
    session: AsyncSession, page: PageParams, status: RunStatus | None
) -> tuple[list[PipelineRun], int]:
    query = select(PipelineRun)
    if status is not None:
        query = query.where(PipelineRun.status == status)
    return await _page(session, query, page, PipelineRun.created_at.desc(), PipelineRun.id)


async def get_run(session: AsyncSession, run_id: uuid.UUID) -> PipelineRun:
    run = await session.get(PipelineRun, run_id)
    if run is None:
        raise RunNotFound()
    return run


async def list_exceptions(
    session: AsyncSession,
    run_id: uuid.UUID,
    page: PageParams,
    rule: str | None,
    severity: Severity | None,
) -> tuple[list[LoanException], int]:
    await get_run(session, run_id)
    query = select(LoanException).where(LoanException.run_id == run_id)
    if rule is not None:
        query = query.where(LoanException.rule_id == rule)
    if severity is not None:
        query = query.where(LoanException.severity == severity)
    return await _page(session, query, page, LoanException.seq)


async def list_facts(
    session: AsyncSession, run_id: uuid.UUID, page: PageParams, eligible: bool | None
) -> tuple[list[LoanFact], int]:
    await get_run(session, run_id)
    query = select(LoanFact).where(LoanFact.run_id == run_id)
    if eligible is not None:
        query = query.where(LoanFact.eligible == eligible)
    return await _page(session, query, page, LoanFact.row_number)


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
