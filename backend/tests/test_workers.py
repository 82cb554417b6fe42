"""Runs across real processes: several API servers, Celery workers, killed and stopped ones.

Everything here runs as real processes on the test PostgreSQL and Redis
(uvicorn servers, `celery worker` with its prefork pool), with
PIPELINE_LEASE_SECONDS=2. Runs are held mid-execution by the file gate of
worker_support; every wait polls a condition under a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from backend.config import Settings
from backend.models import PipelineRun, RunStatus
from backend.observability.trace_ids import xray_trace_id
from backend.pipeline.phases import PHASE_NAMES
from backend.tests.conftest import ADMIN_PASSWORD, bearer, login
from backend.tests.hardening_support import client_for, running_app
from backend.tests.obs_helpers import OtlpReceiver
from backend.tests.pipeline_support import KNOWN_TAPE, upload_tape
from backend.tests.worker_support import (
    DEADLINE,
    Api,
    Gate,
    Process,
    api_server,
    celery_worker,
    row,
    wait_for,
    wait_ready,
    wait_worker_ready,
)
from backend.worker import RUN_TASK

# The hand-made tape: 14 rows, 10 readable (facts), 12 exceptions.
TAPE_FACTS, TAPE_EXCEPTIONS = 10, 12


def active_runs(url: str) -> list[Any]:
    async def read() -> list[Any]:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return list(
                    (
                        await conn.execute(
                            select(PipelineRun.id, PipelineRun.status).where(
                                PipelineRun.status.in_([RunStatus.QUEUED, RunStatus.RUNNING])
                            )
                        )
                    ).all()
                )
        finally:
            await engine.dispose()

    return asyncio.run(read())


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path / "gate")


def test_a_second_api_process_leaves_the_first_ones_run_alone(
    clean_db: str, tmp_path: Path, gate: Gate
) -> None:
    env = {"GATE_DIR": str(gate.folder)}
    with api_server(tmp_path, "api-a", "backend.tests.gated_app:app", **env) as first:
        api = Api(wait_ready(first))
        run_id = api.submit(api.upload("known.csv", KNOWN_TAPE))["run_id"]
        wait_for(lambda: gate.entered(run_id), "the run to start in the first process")
        owner = row(clean_db, run_id).owner
        assert owner is not None and f":{first.pid}:" in owner
        leased = row(clean_db, run_id).lease_expires_at
        assert leased is not None

        with api_server(tmp_path, "api-b", "backend.tests.gated_app:app", **env) as second:
            # Up means its start-up recovery has run.
            wait_ready(second)
            # Two renewals by the first process later, the run is still its own.
            wait_for(
                lambda: (
                    (row(clean_db, run_id).lease_expires_at or leased).timestamp()
                    >= leased.timestamp() + 2
                ),
                "two lease renewals",
            )
            now = row(clean_db, run_id)
            assert (now.status, now.owner, now.attempts) == (RunStatus.RUNNING, owner, 1)
            assert not second.events("pipeline.run.requeued")

            gate.open()
            run = api.wait_finished(run_id)
        assert (run["status"], run["error_message"]) == ("completed", None), run
        assert (run["total_loans"], run["exception_count"]) == (14, TAPE_EXCEPTIONS)
        assert api.total(run_id, "facts") == TAPE_FACTS
        final = row(clean_db, run_id)
        assert (final.owner, final.attempts, final.lease_expires_at) == (owner, 1, None)
        assert gate.entered(run_id) == [first.pid]
        api.close()


@contextmanager
def run_held_by_worker(
    tmp_path: Path, gate: Gate, name: str, **worker_env: str
) -> Iterator[tuple[Process, Process, Api, str]]:
    """A Celery-mode API server and a gated worker `name`, with the hand-made tape's run
    submitted and held at the gate inside that worker."""
    with (
        api_server(tmp_path, "api", PIPELINE_EXECUTOR="celery") as server,
        celery_worker(
            tmp_path, name, "backend.tests.gated_worker", GATE_DIR=str(gate.folder), **worker_env
        ) as worker,
    ):
        api = Api(wait_ready(server))
        wait_worker_ready(worker)
        run_id = api.submit(api.upload("known.csv", KNOWN_TAPE))["run_id"]
        wait_for(lambda: gate.entered(run_id), f"the run to reach worker {name}")
        try:
            yield server, worker, api, run_id
        finally:
            api.close()


def test_a_killed_worker_s_run_is_finished_by_another(
    clean_db: str, tmp_path: Path, gate: Gate, broker: str
) -> None:
    with run_held_by_worker(tmp_path, gate, "doomed") as (server, doomed, api, run_id):
        (pid,) = gate.entered(run_id)
        taken = row(clean_db, run_id)
        assert taken.status == RunStatus.RUNNING and f":{pid}:" in (taken.owner or "")

        doomed.kill_all()  # the worker and its pool process, mid-run
        with celery_worker(tmp_path, "rescuer") as rescuer:
            run = api.wait_finished(run_id)
            assert (run["status"], run["error_message"]) == ("completed", None), run
            final = row(clean_db, run_id)
            assert final.attempts == 2
            assert final.owner != taken.owner and final.owner is not None
            assert api.total(run_id, "facts") == TAPE_FACTS
            assert api.total(run_id, "exceptions") == TAPE_EXCEPTIONS
            wait_for(lambda: rescuer.events("pipeline.run.completed"), "the rescuer's log line")
        wait_for(lambda: server.events("pipeline.run.requeued"), "the API's requeue line")
        assert active_runs(clean_db) == []


def test_sigterm_hands_a_worker_s_run_back(
    clean_db: str, tmp_path: Path, gate: Gate, broker: str
) -> None:
    held = run_held_by_worker(tmp_path, gate, "stopping", PIPELINE_DRAIN_SECONDS="1")
    with held as (_server, stopping, api, run_id):
        # The drain (1 s) runs out with the run still held: it goes back to the queue,
        # and the worker exits cleanly.
        assert stopping.terminate(timeout=30) == 0
        assert stopping.events("pipeline.run.handed_back")
        back = row(clean_db, run_id)
        assert (back.status, back.owner, back.attempts) == (RunStatus.QUEUED, None, 1)
        assert api.total(run_id, "facts") == 0

        with celery_worker(tmp_path, "next") as following:
            run = api.wait_finished(run_id)
            assert (run["status"], run["error_message"]) == ("completed", None), run
            wait_for(lambda: following.events("pipeline.run.completed"), "the worker's log line")
        assert row(clean_db, run_id).attempts == 2
        assert api.total(run_id, "facts") == TAPE_FACTS


async def test_one_trace_through_the_queue(
    settings: Settings, tmp_path: Path, broker: str, exporter: InMemorySpanExporter
) -> None:
    """The API (here, in process) publishes; a real worker process executes and exports
    its spans over OTLP/HTTP to a real receiver."""
    api_settings = settings.model_copy(
        update={
            "PIPELINE_EXECUTOR": "celery",
            "CELERY_BROKER_URL": broker,
            "PIPELINE_LEASE_SECONDS": 2.0,
            "STORAGE_LOCAL_ROOT": str(tmp_path / "storage"),
        }
    )
    with OtlpReceiver() as receiver:
        worker_env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_SERVICE_NAME": "loan-engine-worker",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
        }
        with celery_worker(tmp_path, "traced", **worker_env) as worker:
            async with running_app(api_settings, exporter) as app, client_for(app) as client:
                headers = bearer(await login(client, "admin", ADMIN_PASSWORD))
                path = await upload_tape(client, headers, "known.csv", KNOWN_TAPE)
                exporter.clear()
                response = await client.post(
                    "/api/pipeline/run", json={"input_path": path}, headers=headers
                )
                assert response.status_code == 202, response.text
                accepted = response.json()
                await asyncio.to_thread(wait_worker_ready, worker)
                run = await finished(client, headers, accepted["run_id"])
                assert run["status"] == "completed", run
            request_spans = list(exporter.get_finished_spans())
            run_trace = int(accepted["trace_id"], 16)

            def run_and_task_spans() -> bool:
                # The task span ends after the run span inside it: wait for both.
                names = {s.name for _r, s in receiver.spans()}
                return {"pipeline.run", f"run/{RUN_TASK}"} <= names

            await asyncio.to_thread(
                wait_for, run_and_task_spans, "the worker's run and task spans at the receiver"
            )

            # The worker's own metrics go out over OTLP too (it has no /metrics).
            def worker_counted_the_run() -> bool:
                return any(
                    metric.name == "loan_engine.pipeline.runs"
                    and resource["service.name"] == "loan-engine-worker"
                    for resource, metric in receiver.metrics()
                )

            await asyncio.to_thread(wait_for, worker_counted_the_run, "the worker's run metric")
            # Everything the worker sent, with the ids as integers.
            received = [(resource, span) for resource, span in receiver.spans()]
            lines = worker.lines()

    # The request's trace: its server span and, under it, the publish span.
    (server,) = [s for s in request_spans if s.name == "POST /api/pipeline/run"]
    (publish,) = [s for s in request_spans if s.name == f"apply_async/{RUN_TASK}"]
    assert publish.kind == SpanKind.PRODUCER
    assert publish.parent is not None and publish.parent.span_id == server.context.span_id

    spans = [span for _resource, span in received]
    resources = {resource["service.name"] for resource, _span in received}
    assert resources == {"loan-engine-worker"}
    by_trace: dict[int, list[Any]] = {}
    for span in spans:
        by_trace.setdefault(int.from_bytes(span.trace_id, "big"), []).append(span)

    # The worker's task span continues the request's trace, under the publish span.
    (consumer,) = [s for s in spans if s.name == f"run/{RUN_TASK}"]
    assert int.from_bytes(consumer.trace_id, "big") == server.context.trace_id
    assert int.from_bytes(consumer.parent_span_id, "big") == publish.context.span_id

    # The run's own trace (the id the API returned): run span, queue wait, seven phases, SQL.
    mine = by_trace[run_trace]
    (root,) = [s for s in mine if s.name == "pipeline.run"]
    assert not root.parent_span_id
    linked = {(int.from_bytes(k.trace_id, "big"), int.from_bytes(k.span_id, "big"))
              for k in root.links}  # fmt: skip
    assert (server.context.trace_id, server.context.span_id) in linked
    assert (server.context.trace_id, int.from_bytes(consumer.span_id, "big")) in linked
    children = [s for s in mine if s.parent_span_id == root.span_id]
    (wait,) = [s for s in children if s.name == "pipeline.queue.wait"]
    assert wait.start_time_unix_nano == root.start_time_unix_nano
    assert wait.end_time_unix_nano >= wait.start_time_unix_nano
    assert {s.name for s in children if s.name.startswith("pipeline.phase.")} == {
        f"pipeline.phase.{name}" for name in PHASE_NAMES
    }
    (persist,) = [s for s in mine if s.name == "pipeline.phase.persist"]
    under_persist = {s.name for s in mine if s.parent_span_id == persist.span_id}
    assert {"BEGIN", "COPY loan_facts", "COMMIT"} <= under_persist
    sql = [s for s in mine if s.kind == s.SPAN_KIND_CLIENT]
    assert any(s.name.startswith("UPDATE") for s in sql)  # the status writes, by SQLAlchemy
    # The worker's log lines of the run carry the run and its trace.
    run_lines = [line for line in lines if line.get("run_id") == accepted["run_id"]]
    assert {line["event"] for line in run_lines} >= {
        "pipeline.run.started",
        "pipeline.phase.completed",
        "pipeline.run.completed",
    }
    for line in run_lines:
        if line["event"].startswith("pipeline.phase") or line["event"] == "pipeline.run.completed":
            assert line["trace_id"] == accepted["trace_id"], line
            assert line["xray_trace_id"] == xray_trace_id(accepted["trace_id"])


async def finished(client: Any, headers: dict[str, str], run_id: str) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:
        response = await client.get(f"/api/pipeline/runs/{run_id}", headers=headers)
        body: dict[str, Any] = response.json()
        if body["status"] in ("completed", "failed"):
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)
