"""The pipeline end to end over HTTP: upload -> run -> results, failures, and the runner."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from backend.api.main import create_app
from backend.config import Settings
from backend.database import Database
from backend.models import LoanException, LoanFact, PipelineRun, RunStatus
from backend.pipeline.executor import INTERNAL_MESSAGE
from backend.pipeline.leases import gave_up_message
from backend.pipeline.phases import default_phases
from backend.pipeline.phases.base import Phase, RunContext
from backend.pipeline.phases.report import ReportPhase
from backend.pipeline.runner import PipelineRunner
from backend.pipeline.tape import generate_tape
from backend.tests.conftest import UserFactory, make_team
from backend.tests.pipeline_support import (
    DEADLINE_SECONDS,
    KNOWN_TAPE,
    upload_tape,
)


async def start(client: httpx.AsyncClient, headers: dict[str, str], path: str) -> str:
    response = await client.post("/api/pipeline/run", json={"input_path": path}, headers=headers)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    run_id: str = response.json()["run_id"]
    return run_id


async def wait_until(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    run_id: str,
    statuses: set[str] | None = None,
) -> dict[str, Any]:
    """Poll the run until it reaches one of `statuses` (a final one by default)."""
    wanted = statuses or {"completed", "failed", "interrupted"}
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        response = await client.get(f"/api/pipeline/runs/{run_id}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in wanted:
            return body
        assert time.monotonic() < deadline, f"run {run_id} stuck in {body['status']}"
        await asyncio.sleep(0.02)


async def download(client: httpx.AsyncClient, headers: dict[str, str], path: str) -> bytes:
    response = await client.get("/api/files/download", params={"path": path}, headers=headers)
    assert response.status_code == 200, (path, response.text)
    return response.content


async def test_known_tape_upload_run_and_results(
    client: httpx.AsyncClient,
    admin_headers: dict[str, str],
    make_user: UserFactory,
    app: FastAPI,
) -> None:
    team = await make_team(client, admin_headers, "Pacific")
    analyst = (await make_user("analyst", sales_team_id=team))["headers"]
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    before = app.state.metrics.snapshot()["pipeline"]  # this process, all tests
    run_id = await start(client, analyst, path)
    run = await wait_until(client, analyst, run_id)

    assert run["status"] == "completed", run
    assert run["error_message"] is None
    assert (
        run["total_loans"],
        run["eligible_loans"],
        run["ineligible_loans"],
        run["rejected_loans"],
        run["exception_count"],
    ) == (14, 4, 6, 4, 12)
    # The reports go to the run's scope: its team's, as the tape did.
    assert path == f"inputs/team-{team}/known.csv"
    assert run["output_prefix"] == f"outputs/team-{team}/{run_id}/"
    assert set(run["phase_durations"]) == {
        "ingest", "validate", "normalize", "enrich", "eligibility", "persist", "report",
    }  # fmt: skip
    assert run["started_at"] and run["finished_at"]
    after = app.state.metrics.snapshot()["pipeline"]
    assert after["completed"] - before["completed"] == 1
    assert after["loans_processed"] - before["loans_processed"] == 14

    viewer = (await make_user("viewer", sales_team_id=team))["headers"]
    exceptions = await client.get(
        f"/api/pipeline/runs/{run_id}/exceptions", params={"limit": 100}, headers=viewer
    )
    assert exceptions.status_code == 200
    found = {(e["row_number"], e["severity"], e["rule_id"]) for e in exceptions.json()["items"]}
    assert found == {
        (3, "rule", "min_credit_score"),
        (4, "rule", "allowed_term"),
        (4, "rule", "allowed_state"),
        (5, "rule", "max_amount"),
        (6, "rule", "max_dti"),
        (7, "rule", "max_ltv"),
        (8, "rule", "allowed_property_type"),
        (9, "error", "invalid_number"),
        (10, "error", "malformed_row"),
        (11, "error", "out_of_range"),
        (11, "error", "invalid_date"),
        (12, "error", "duplicate_loan_id"),
    }
    by_rule = await client.get(
        f"/api/pipeline/runs/{run_id}/exceptions", params={"rule": "max_dti"}, headers=viewer
    )
    body = by_rule.json()
    assert body["total"] == 1
    assert body["items"][0]["loan_id"] == "L006"
    assert body["items"][0]["message"] == "DTI 0.5664 is above the maximum 0.43"
    errors_only = await client.get(
        f"/api/pipeline/runs/{run_id}/exceptions", params={"severity": "error"}, headers=viewer
    )
    assert errors_only.json()["total"] == 5

    eligible = await client.get(
        f"/api/pipeline/runs/{run_id}/facts", params={"eligible": "true"}, headers=viewer
    )
    facts = eligible.json()
    assert facts["total"] == 4
    assert [f["loan_id"] for f in facts["items"]] == ["L001", "L002", "L013", "L014"]
    first, second, third, fourth = facts["items"]
    assert first["monthly_payment"] == pytest.approx(1199.10)
    assert (first["ltv"], first["dti"], first["grade"]) == (0.8, 0.1699, "B")
    assert first["sales_team"] == "Pacific, North"
    assert (second["state"], second["property_type"], second["occupancy"]) == (
        "NY",
        "SFR",
        "PRIMARY",
    )
    assert second["grade"] == "A"
    assert (third["rate"], third["origination_date"]) == (0.065, "2024-03-15")
    assert third["sales_team"] == "Mountain\nand Coast"
    assert (fourth["credit_score"], fourth["ltv"], fourth["grade"]) == (620, 0.97, "D")
    ineligible = await client.get(
        f"/api/pipeline/runs/{run_id}/facts", params={"eligible": "false"}, headers=viewer
    )
    assert ineligible.json()["total"] == 6

    summary = json.loads(await download(client, viewer, run["output_prefix"] + "summary.json"))
    assert summary["counts"] == {
        "total": 14,
        "eligible": 4,
        "ineligible": 6,
        "rejected": 4,
        "exceptions": 12,
    }
    assert summary["rule_failures"]["allowed_state"] == 1
    eligible_csv = list(
        csv.DictReader(
            io.StringIO(
                (await download(client, viewer, run["output_prefix"] + "eligible.csv")).decode()
            )
        )
    )
    assert [r["loan_id"] for r in eligible_csv] == ["L001", "L002", "L013", "L014"]
    exceptions_csv = list(
        csv.DictReader(
            io.StringIO(
                (await download(client, viewer, run["output_prefix"] + "exceptions.csv")).decode()
            )
        )
    )
    assert len(exceptions_csv) == 12
    assert {r["rule_id"] for r in exceptions_csv} >= {"malformed_row", "max_ltv"}


async def test_gzipped_tape_runs_like_the_plain_one(
    client: httpx.AsyncClient, analyst: dict[str, str]
) -> None:
    import gzip

    path = await upload_tape(client, analyst, "known.csv.gz", gzip.compress(KNOWN_TAPE))
    run = await wait_until(client, analyst, await start(client, analyst, path))
    assert (run["status"], run["total_loans"], run["eligible_loans"]) == ("completed", 14, 4)


async def test_missing_column_fails_cleanly(
    client: httpx.AsyncClient, analyst: dict[str, str], app: FastAPI
) -> None:
    lines = KNOWN_TAPE.decode().splitlines()
    header = lines[0].replace(",credit_score", "").replace(",state", "")
    path = await upload_tape(client, analyst, "short.csv", (header + "\nL1,B1,1,2\n").encode())
    before = app.state.metrics.snapshot()["pipeline"]  # this process, all tests
    run_id = await start(client, analyst, path)
    run = await wait_until(client, analyst, run_id)
    assert run["status"] == "failed"
    assert run["error_message"] == "The tape is missing required columns: credit_score, state"
    assert run["total_loans"] == 0
    assert app.state.metrics.snapshot()["pipeline"]["failed"] - before["failed"] == 1
    facts = await client.get(f"/api/pipeline/runs/{run_id}/facts", headers=analyst)
    assert facts.json()["total"] == 0
    prefix = run["output_prefix"].removeprefix("outputs/")
    outputs = await client.get(
        "/api/files", params={"area": "outputs", "prefix": prefix}, headers=analyst
    )
    assert outputs.json()["total"] == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "The tape is empty: it has no header row"),
        (b"loan_id,amount\n\xff\xfe\xfa,1\n", "The tape is not UTF-8 text"),
    ],
)
async def test_unreadable_tapes_fail_with_a_clear_message(
    client: httpx.AsyncClient, analyst: dict[str, str], app: FastAPI, content: bytes, message: str
) -> None:
    # Written straight to storage: the upload checks would refuse these files.
    storage = app.state.storage

    async def body() -> Any:
        yield content

    me = (await client.get("/api/auth/me", headers=analyst)).json()
    path = f"inputs/user-{me['id']}/bad.csv"  # the analyst's own scope
    await storage.save(path, body())
    run = await wait_until(client, analyst, await start(client, analyst, path))
    assert run["status"] == "failed"
    assert run["error_message"].startswith(message)
    assert "Traceback" not in run["error_message"]


async def test_malformed_rows_never_crash_a_run(
    client: httpx.AsyncClient, analyst: dict[str, str]
) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerows(generate_tape(400, seed=7, ineligible_share=0.3, malformed_share=0.4))
    garbage = [
        "\n,,,,,,,,,,,,,\n",
        "L900,B,1e999,nan,-5,abc,inf,-1,0,CAL,,,2024-13-01,x\n",
        'L901,"unbalanced,quote\n',
        "\u2603,\u2603,\u2603\n",
        "L902" + ",x" * 40 + "\n",
        "L903,B903,200000,6,360,700,120000,500,250000,CA,SFR,PRIMARY,9999-01-01,"
        + "t" * 101
        + "\n",
    ]
    content = (out.getvalue() + "".join(garbage)).encode()
    path = await upload_tape(client, analyst, "messy.csv", content)
    run = await wait_until(client, analyst, await start(client, analyst, path))
    assert run["status"] == "completed", run
    assert (
        run["total_loans"]
        == run["eligible_loans"] + run["ineligible_loans"] + run["rejected_loans"]
    )
    assert run["rejected_loans"] >= 150
    assert run["eligible_loans"] > 0
    assert run["ineligible_loans"] > 0


async def test_run_requests_are_checked(
    client: httpx.AsyncClient, analyst: dict[str, str], make_user: UserFactory
) -> None:
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    viewer = (await make_user("viewer"))["headers"]
    denied = await client.post("/api/pipeline/run", json={"input_path": path}, headers=viewer)
    assert denied.status_code == 403
    anonymous = await client.post("/api/pipeline/run", json={"input_path": path})
    assert anonymous.status_code == 401
    for bad, status in [
        ("inputs/../outputs/x.csv", 400),
        ("inputs/%2e%2e/secret.csv", 400),
        ("/etc/passwd", 400),
        ("outputs/x/eligible.csv", 400),
        ("inputs/missing.csv", 404),
    ]:
        response = await client.post("/api/pipeline/run", json={"input_path": bad}, headers=analyst)
        assert response.status_code == status, (bad, response.text)
    unknown = await client.get(f"/api/pipeline/runs/{uuid.uuid4()}", headers=viewer)
    assert unknown.status_code == 404
    assert (await client.get("/api/pipeline/runs/not-a-uuid", headers=viewer)).status_code == 422
    for sub in ("exceptions", "facts"):
        missing = await client.get(f"/api/pipeline/runs/{uuid.uuid4()}/{sub}", headers=viewer)
        assert missing.status_code == 404


async def test_list_runs_filters_and_paginates(
    client: httpx.AsyncClient, analyst: dict[str, str]
) -> None:
    good = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    bad = await upload_tape(client, analyst, "bad.csv", b"loan_id,amount\nL1,2\n")
    ids = [await start(client, analyst, p) for p in (good, bad, good)]
    for run_id in ids:
        await wait_until(client, analyst, run_id)
    listing = await client.get("/api/pipeline/runs", params={"limit": 2}, headers=analyst)
    body = listing.json()
    assert (body["total"], len(body["items"])) == (3, 2)
    completed = await client.get(
        "/api/pipeline/runs", params={"status": "completed"}, headers=analyst
    )
    assert {r["id"] for r in completed.json()["items"]} == {ids[0], ids[2]}
    failed = await client.get("/api/pipeline/runs", params={"status": "failed"}, headers=analyst)
    assert [r["id"] for r in failed.json()["items"]] == [ids[1]]
    assert (
        await client.get("/api/pipeline/runs", params={"status": "bogus"}, headers=analyst)
    ).status_code == 422


class Gates:
    """Holds runs at `before_execute` until released, recording how many wait at once."""

    def __init__(self) -> None:
        self.entered: asyncio.Queue[uuid.UUID] = asyncio.Queue()
        self.release: dict[uuid.UUID, asyncio.Event] = {}
        self.inside = 0
        self.max_inside = 0

    async def __call__(self, run_id: uuid.UUID) -> None:
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        event = self.release.setdefault(run_id, asyncio.Event())
        await self.entered.put(run_id)
        try:
            await event.wait()
        finally:
            self.inside -= 1

    def open(self, run_id: uuid.UUID) -> None:
        self.release.setdefault(run_id, asyncio.Event()).set()


async def statuses(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, str]:
    body = (await client.get("/api/pipeline/runs", headers=headers)).json()
    return {r["id"]: r["status"] for r in body["items"]}


async def test_concurrency_bound_holds(
    client: httpx.AsyncClient, analyst: dict[str, str], app: FastAPI
) -> None:
    runner: PipelineRunner = app.state.runner
    assert app.state.settings.PIPELINE_MAX_CONCURRENT_RUNS == 2
    gates = Gates()
    runner.before_execute = gates
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    ids = [await start(client, analyst, path) for _ in range(5)]

    first = {await asyncio.wait_for(gates.entered.get(), DEADLINE_SECONDS) for _ in range(2)}
    now = await statuses(client, analyst)
    assert sorted(now.values()) == ["queued", "queued", "queued", "running", "running"]
    assert {uuid.UUID(i) for i, s in now.items() if s == "running"} == first
    assert runner.executing == 2

    # Each released run frees exactly one slot for exactly one queued run.
    held = set(first)
    started = len(first)
    while held:
        done = held.pop()
        gates.open(done)
        await wait_until(client, analyst, str(done))
        if started < len(ids):
            held.add(await asyncio.wait_for(gates.entered.get(), DEADLINE_SECONDS))
            started += 1
        now = await statuses(client, analyst)
        running = {uuid.UUID(i) for i, s in now.items() if s == "running"}
        assert running == held
        assert list(now.values()).count("queued") == len(ids) - started
    assert gates.max_inside == 2
    final = await statuses(client, analyst)
    assert set(final) == set(ids)
    assert set(final.values()) == {"completed"}


async def test_shutdown_hands_back_what_does_not_drain(
    client: httpx.AsyncClient, analyst: dict[str, str], app: FastAPI, settings: Settings
) -> None:
    runner: PipelineRunner = app.state.runner
    gates = Gates()
    runner.before_execute = gates
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    ids = [await start(client, analyst, path) for _ in range(3)]
    for _ in range(2):
        await asyncio.wait_for(gates.entered.get(), DEADLINE_SECONDS)
    await runner.shutdown(drain_seconds=0)
    # Two were executing, one waited for a slot: all three go back to the queue.
    final = await statuses(client, analyst)
    assert [final[i] for i in ids] == ["queued"] * 3
    database: Database = app.state.db
    async with database.session() as session:
        rows = (
            await session.scalars(
                select(PipelineRun).where(PipelineRun.id.in_([uuid.UUID(i) for i in ids]))
            )
        ).all()
    assert sorted(r.attempts for r in rows) == [0, 1, 1]
    assert {r.owner for r in rows} == {runner.leases.owner}
    assert all(r.error_message is None and r.finished_at is None for r in rows)
    refused = await client.post("/api/pipeline/run", json={"input_path": path}, headers=analyst)
    assert refused.status_code == 503
    # The next process to start takes them over and finishes them.
    restarted = create_app(settings)
    async with restarted.router.lifespan_context(restarted):
        for run_id in ids:
            run = await wait_until(client, analyst, run_id)
            assert (run["status"], run["error_message"]) == ("completed", None), run
            assert run["total_loans"] == 14


async def test_shutdown_drains_runs_that_finish_in_time(
    client: httpx.AsyncClient, analyst: dict[str, str], app: FastAPI
) -> None:
    runner: PipelineRunner = app.state.runner
    gates = Gates()
    runner.before_execute = gates
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    run_id = await start(client, analyst, path)
    entered = await asyncio.wait_for(gates.entered.get(), DEADLINE_SECONDS)
    shutting = asyncio.create_task(runner.shutdown(drain_seconds=DEADLINE_SECONDS))
    gates.open(entered)
    await asyncio.wait_for(shutting, DEADLINE_SECONDS)
    run = (await client.get(f"/api/pipeline/runs/{run_id}", headers=analyst)).json()
    assert run["status"] == "completed"


class ExplodingReport(ReportPhase):
    async def finish(self, ctx: RunContext) -> None:
        raise RuntimeError("disk on fire at /secret/path")


async def test_a_crash_after_persist_leaves_no_facts(
    client: httpx.AsyncClient, analyst: dict[str, str], app: FastAPI
) -> None:
    def phases() -> list[Phase]:
        return [*default_phases()[:-1], ExplodingReport()]

    app.state.runner.engine.phases = phases
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    run_id = await start(client, analyst, path)
    run = await wait_until(client, analyst, run_id)
    assert run["status"] == "failed"
    assert run["error_message"] == INTERNAL_MESSAGE
    database: Database = app.state.db
    async with database.session() as session:
        facts = await session.scalar(
            select(func.count()).select_from(LoanFact).where(LoanFact.run_id == uuid.UUID(run_id))
        )
        problems = await session.scalar(
            select(func.count())
            .select_from(LoanException)
            .where(LoanException.run_id == uuid.UUID(run_id))
        )
    assert (facts, problems) == (0, 0)


async def test_startup_recovers_only_runs_whose_lease_expired(
    app: FastAPI, settings: Settings
) -> None:
    database: Database = app.state.db
    past = datetime.now(UTC) - timedelta(minutes=5)
    future = datetime.now(UTC) + timedelta(minutes=5)

    def run(status: RunStatus, **fields: Any) -> PipelineRun:
        return PipelineRun(id=uuid.uuid4(), status=status, input_path="inputs/a.csv", **fields)

    dead = run(RunStatus.RUNNING, owner="gone:1:a", lease_expires_at=past, attempts=1)
    alive = run(RunStatus.RUNNING, owner="live:2:b", lease_expires_at=future, attempts=1)
    waiting = run(RunStatus.QUEUED, owner="live:2:b", lease_expires_at=future)
    spent = run(
        RunStatus.RUNNING,
        owner="gone:1:a",
        lease_expires_at=past,
        attempts=settings.PIPELINE_MAX_ATTEMPTS,
    )
    done = run(RunStatus.COMPLETED)
    async with database.session() as session:
        session.add_all([dead, alive, waiting, spent, done])
    restarted = create_app(settings)
    async with restarted.router.lifespan_context(restarted):
        await asyncio.wait_for(restarted.state.runner.join(), DEADLINE_SECONDS)
        async with database.session() as session:

            async def now(r: PipelineRun) -> PipelineRun:
                found = await session.get(PipelineRun, r.id, populate_existing=True)
                assert found is not None
                return found

            # Taken over and executed again (its tape does not exist: failed). The test
            # loop is shared by the whole session, so another live runner in this process
            # may win the takeover: the owner is a live one of this process, never the dead.
            deadline = asyncio.get_running_loop().time() + DEADLINE_SECONDS
            recovered = await now(dead)
            while recovered.status != RunStatus.FAILED:
                assert asyncio.get_running_loop().time() < deadline, recovered.status
                await asyncio.sleep(0.05)
                recovered = await now(dead)
            assert recovered.owner is not None
            assert recovered.owner.startswith(f"{socket.gethostname()}:{os.getpid()}:")
            assert (recovered.status, recovered.attempts) == (RunStatus.FAILED, 2)
            assert recovered.error_message == "ingest: File not found"
            # Live leases are left alone, whoever holds them.
            for untouched in (alive, waiting):
                row = await now(untouched)
                assert (row.status, row.owner) == (untouched.status, "live:2:b")
            gave_up = await now(spent)
            assert gave_up.status == RunStatus.FAILED
            assert gave_up.error_message == gave_up_message(settings.PIPELINE_MAX_ATTEMPTS)
            assert (await now(done)).status == RunStatus.COMPLETED


class HeldReport(ReportPhase):
    """Stops the run inside its first batch, after persist has sent that batch."""

    reached: asyncio.Event
    never: asyncio.Event

    async def process(self, batch: Any, ctx: RunContext) -> None:
        self.reached.set()
        await self.never.wait()


async def test_a_run_cut_off_mid_batch_is_handed_back_with_no_facts(
    client: httpx.AsyncClient, analyst: dict[str, str], app: FastAPI
) -> None:
    reached, never = asyncio.Event(), asyncio.Event()

    def phases() -> list[Phase]:
        held = HeldReport()
        held.reached, held.never = reached, never
        return [*default_phases()[:-1], held]

    app.state.runner.engine.phases = phases
    path = await upload_tape(client, analyst, "known.csv", KNOWN_TAPE)
    run_id = await start(client, analyst, path)
    await asyncio.wait_for(reached.wait(), DEADLINE_SECONDS)
    await app.state.runner.shutdown(drain_seconds=0)
    run = (await client.get(f"/api/pipeline/runs/{run_id}", headers=analyst)).json()
    assert (run["status"], run["error_message"]) == ("queued", None)
    facts = await client.get(f"/api/pipeline/runs/{run_id}/facts", headers=analyst)
    assert facts.json()["total"] == 0
    # The pool still works: the persist connection was rolled back or discarded.
    database: Database = app.state.db
    async with database.session() as session:
        assert await session.scalar(select(func.count()).select_from(LoanFact)) == 0


async def test_pipeline_on_s3_storage(clean_db: str, s3_bucket: str, moto_endpoint: str) -> None:
    from backend.tests.conftest import ADMIN_PASSWORD, bearer, login, make_settings

    settings = make_settings(
        DATABASE_URL=clean_db,
        STORAGE_TYPE="s3",
        S3_BUCKET=s3_bucket,
        S3_ENDPOINT_URL=moto_endpoint,
        PIPELINE_BATCH_SIZE=3,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            headers = bearer(await login(client, "admin", ADMIN_PASSWORD))
            path = await upload_tape(client, headers, "known.csv", KNOWN_TAPE)
            run = await wait_until(client, headers, await start(client, headers, path))
            assert (run["status"], run["total_loans"], run["eligible_loans"]) == (
                "completed",
                14,
                4,
            )
            assert run["exception_count"] == 12
            summary = json.loads(
                await download(client, headers, f"{run['output_prefix']}summary.json")
            )
            assert summary["counts"]["rejected"] == 4
