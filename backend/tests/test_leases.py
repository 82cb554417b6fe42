"""Run ownership on the real database: claims, leases, conditional writes, the queue bound.

Two executors here are two `Leases` owners on one database, as two processes
would be; the API tests go through the in-process runner over HTTP.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from backend.config import Settings
from backend.database import Database
from backend.models import LoanFact, PipelineRun, RunStatus
from backend.pipeline.engine import PipelineEngine
from backend.pipeline.executor import LeaseKeeper, Outcome, RunExecutor
from backend.pipeline.leases import Leases, Recovered
from backend.pipeline.phases.base import LeaseLost
from backend.pipeline.runner import PipelineRunner
from backend.storage.local import LocalStorage
from backend.tests.pipeline_support import DEADLINE_SECONDS, KNOWN_TAPE, upload_tape
from backend.tests.test_pipeline import Gates, wait_until


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    db = Database(settings)
    try:
        yield db
    finally:
        await db.dispose()


async def queued_run(database: Database, storage: LocalStorage) -> uuid.UUID:
    await storage.save("inputs/known.csv", one_chunk(KNOWN_TAPE))
    run_id = uuid.uuid4()
    async with database.session() as session:
        session.add(PipelineRun(id=run_id, status=RunStatus.QUEUED, input_path="inputs/known.csv"))
    return run_id


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def expire(database: Database, run_id: uuid.UUID) -> None:
    """As if the owner went silent: its lease is in the past."""
    async with database.session() as session:
        await session.execute(
            update(PipelineRun)
            .where(PipelineRun.id == run_id)
            .values(lease_expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )


async def take_over(database: Database, run_id: uuid.UUID, new: Leases) -> None:
    """The owner goes silent; `new`'s recovery re-queues the run and `new` claims it."""
    await expire(database, run_id)
    recovered = await new.recover_expired(3, new_owner=new.owner)
    assert recovered.requeued == [run_id]
    assert await new.claim(run_id, "outputs/x/") is not None


async def read(database: Database, run_id: uuid.UUID) -> PipelineRun:
    async with database.session() as session:
        run = await session.get(PipelineRun, run_id)
        assert run is not None
        return run


async def facts(database: Database, run_id: uuid.UUID) -> int:
    async with database.session() as session:
        count = await session.scalar(
            select(func.count()).select_from(LoanFact).where(LoanFact.run_id == run_id)
        )
    return int(count or 0)


async def test_a_writer_that_lost_its_lease_writes_nothing(
    database: Database, settings: Settings
) -> None:
    storage = LocalStorage(settings.STORAGE_LOCAL_ROOT)
    run_id = await queued_run(database, storage)
    old, new = Leases(database, 30), Leases(database, 30)
    claim = await old.claim(run_id, "outputs/x/")
    assert claim is not None and claim.attempt == 1
    assert await new.claim(run_id, "outputs/x/") is None  # running: nobody else claims it
    # A live lease is never recovered.
    assert await new.recover_expired(3, new_owner=new.owner) == Recovered([], [])
    await take_over(database, run_id, new)

    # The old owner comes back: every write it tries is refused, and changes nothing.
    assert await old.renew([run_id]) == set()
    assert await old.complete(run_id, {"total_loans": 99}) is False
    assert await old.fail(run_id, RunStatus.FAILED, "stale") is False
    assert await old.hand_back(run_id, requeue_now=True) is False
    now = await read(database, run_id)
    assert (now.status, now.owner, now.attempts, now.total_loans) == (
        RunStatus.RUNNING,
        new.owner,
        2,
        0,
    )
    assert await new.complete(run_id, {"total_loans": 14}) is True
    assert (await read(database, run_id)).status == RunStatus.COMPLETED


async def test_persist_commits_only_while_the_run_is_owned(
    database: Database, settings: Settings
) -> None:
    storage = LocalStorage(settings.STORAGE_LOCAL_ROOT)
    run_id = await queued_run(database, storage)
    old, new = Leases(database, 30), Leases(database, 30)
    assert await old.claim(run_id, "outputs/x/") is not None
    await take_over(database, run_id, new)
    engine = PipelineEngine(database, storage, settings)
    with pytest.raises(LeaseLost):
        await engine.execute(run_id, "inputs/known.csv", owner=old.owner)
    assert await facts(database, run_id) == 0
    # The owner's own execution (a second attempt) replaces any rows and commits.
    result = await engine.execute(run_id, "inputs/known.csv", owner=new.owner, attempt=2)
    assert result.counts.total == 14
    assert await facts(database, run_id) == 10


async def test_a_redelivered_run_that_finished_is_not_run_again(
    database: Database, settings: Settings
) -> None:
    storage = LocalStorage(settings.STORAGE_LOCAL_ROOT)
    run_id = await queued_run(database, storage)
    leases = Leases(database, 30)
    executor = RunExecutor(database, storage, settings, leases, LeaseKeeper(leases))
    assert await executor.execute(run_id) == Outcome.COMPLETED
    before = await read(database, run_id)
    assert await executor.execute(run_id) == Outcome.SKIPPED
    other = Leases(database, 30)
    again = RunExecutor(database, storage, settings, other, LeaseKeeper(other))
    assert await again.execute(run_id) == Outcome.SKIPPED
    after = await read(database, run_id)
    assert (after.status, after.attempts, after.finished_at) == (
        RunStatus.COMPLETED,
        1,
        before.finished_at,
    )
    assert await facts(database, run_id) == 10


async def test_a_run_taken_over_mid_execution_stops_and_writes_nothing(
    client: httpx.AsyncClient, analyst: dict[str, str], app: FastAPI
) -> None:
    runner: PipelineRunner = app.state.runner
    gates = Gates()
    runner.before_execute = gates
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    response = await client.post("/api/pipeline/run", json={"input_path": path}, headers=analyst)
    assert response.status_code == 202
    run_id = await asyncio.wait_for(gates.entered.get(), DEADLINE_SECONDS)
    database: Database = app.state.db
    async with database.session() as session:
        await session.execute(
            update(PipelineRun).where(PipelineRun.id == run_id).values(owner="elsewhere:1:x")
        )
    # The next renewal finds the run owned elsewhere: the execution stops at once.
    await runner.keeper.renew_once()
    await asyncio.wait_for(runner.join(), DEADLINE_SECONDS)
    run = await read(database, run_id)
    assert (run.status, run.owner, run.finished_at, run.error_message) == (
        RunStatus.RUNNING,
        "elsewhere:1:x",
        None,
        None,
    )
    assert await facts(database, run_id) == 0


async def test_over_the_queue_bound_a_run_is_refused_and_nothing_is_written(
    settings: Settings, analyst: dict[str, str], client: httpx.AsyncClient, app: FastAPI
) -> None:
    runner: PipelineRunner = app.state.runner
    gates = Gates()
    runner.before_execute = gates
    settings.PIPELINE_MAX_QUEUED_RUNS = 1
    assert settings.PIPELINE_MAX_CONCURRENT_RUNS == 2
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    body = {"input_path": path}
    accepted = []
    for _ in range(2):  # both start executing (two slots), none waits
        response = await client.post("/api/pipeline/run", json=body, headers=analyst)
        accepted.append(response.json()["run_id"])
        await asyncio.wait_for(gates.entered.get(), DEADLINE_SECONDS)
    waiting = await client.post("/api/pipeline/run", json=body, headers=analyst)
    assert waiting.status_code == 202  # queued: the one run allowed to wait
    refused = await client.post("/api/pipeline/run", json=body, headers=analyst)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "30"
    error = refused.json()["error"]
    assert error["code"] == "pipeline_queue_full"
    assert error["details"] == {"queued_runs": 1, "max_queued_runs": 1}
    assert error["request_id"] == refused.headers["X-Request-ID"]
    database: Database = app.state.db
    async with database.session() as session:
        assert await session.scalar(select(func.count()).select_from(PipelineRun)) == 3
    for run_id in accepted:
        gates.open(uuid.UUID(run_id))
    gates.open(uuid.UUID(waiting.json()["run_id"]))
    for run_id in [*accepted, waiting.json()["run_id"]]:
        assert (await wait_until(client, analyst, run_id))["status"] == "completed"
    again = await client.post("/api/pipeline/run", json=body, headers=analyst)
    assert again.status_code == 202
