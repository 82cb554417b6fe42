"""/api/pipeline: start runs (analyst, admin); read runs, exceptions and facts (signed in).

Reads and the tape a run starts from are scoped to the caller by the service.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, status

from backend.api.dependencies import (
    AnalystUser,
    CurrentUser,
    RunnerDep,
    SessionDep,
    SettingsDep,
    StorageDep,
)
from backend.config import Settings
from backend.errors import ServiceUnavailable
from backend.models import PipelineRun, RunStatus, Severity
from backend.pagination import Page, PageDep
from backend.pipeline import service, telemetry
from backend.pipeline.dispatch import DispatchFailed
from backend.pipeline.schemas import (
    ExceptionRead,
    FactRead,
    RunAccepted,
    RunRead,
    RunRequest,
)

router = APIRouter(prefix="/api/pipeline", tags=["pipeline"])

RUN_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such run (or not one the caller may read)"}
}


def _read(run: PipelineRun, settings: Settings) -> RunRead:
    read = RunRead.model_validate(run)
    read.trace_url = telemetry.run_trace_url(settings, run.trace_id)
    return read


@router.post(
    "/run",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunAccepted,
    responses={
        400: {"description": "input_path is not a valid path under inputs/"},
        404: {"description": "No such input file (or not one the caller may read)"},
        429: {"description": "Too many runs are waiting to start (Retry-After says when to retry)"},
        503: {"description": "Shutting down, or the run could not be queued"},
    },
)
async def start_run(
    body: RunRequest,
    user: AnalystUser,
    session: SessionDep,
    storage: StorageDep,
    runner: RunnerDep,
    settings: SettingsDep,
) -> RunAccepted:
    if not runner.accepting:
        raise ServiceUnavailable("The service is shutting down; try again shortly")
    # Broker known to be down: refuse before anything is written.
    runner.check_available()
    # The run becomes a trace of its own, linked to this request's span.
    seed = telemetry.seed_from_request()
    run = await service.create_run(
        session,
        storage,
        user,
        body.input_path,
        leases=runner.leases,
        owner=runner.queue_owner,
        max_queued=settings.PIPELINE_MAX_QUEUED_RUNS,
        seed=seed,
    )
    telemetry.mark_request(run.id, seed)
    try:
        await runner.dispatch(run.id)
    except DispatchFailed as exc:
        # Nobody will ever execute it: take it back, so the client's retry is the only run.
        await runner.leases.withdraw(run.id)
        raise ServiceUnavailable(
            "The run could not be queued; try again shortly",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    return RunAccepted(
        run_id=run.id,
        status=run.status,
        trace_id=run.trace_id,
        trace_url=telemetry.run_trace_url(settings, run.trace_id),
    )


@router.get("/runs", response_model=Page[RunRead])
async def list_runs(
    user: CurrentUser,
    session: SessionDep,
    page: PageDep,
    settings: SettingsDep,
    status: RunStatus | None = None,
) -> Page[RunRead]:
    runs, total = await service.list_runs(session, user, page, status)
    items = [_read(r, settings) for r in runs]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/runs/{run_id}", response_model=RunRead, responses=RUN_NOT_FOUND)
async def get_run(
    run_id: uuid.UUID, user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> RunRead:
    return _read(await service.get_run(session, user, run_id), settings)


@router.get(
    "/runs/{run_id}/exceptions", response_model=Page[ExceptionRead], responses=RUN_NOT_FOUND
)
async def list_exceptions(
    run_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    page: PageDep,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    severity: Severity | None = None,
) -> Page[ExceptionRead]:
    rows, total = await service.list_exceptions(session, user, run_id, page, rule, severity)
    items = [ExceptionRead.model_validate(r) for r in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)


@router.get("/runs/{run_id}/facts", response_model=Page[FactRead], responses=RUN_NOT_FOUND)
async def list_facts(
    run_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    page: PageDep,
    eligible: bool | None = None,
) -> Page[FactRead]:
    rows, total = await service.list_facts(session, user, run_id, page, eligible)
    items = [FactRead.model_validate(r) for r in rows]
    return Page(items=items, total=total, limit=page.limit, offset=page.offset)
