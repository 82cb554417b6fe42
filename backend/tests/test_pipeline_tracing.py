"""Pipeline runs in traces and logs: one trace per run, linked to the request that queued it.

Spans come from an InMemorySpanExporter injected with `create_app(span_exporter=...)`,
log lines are the JSON objects written to stdout, PostgreSQL is real. Runs are
awaited through the runner (`join`, bounded by a deadline), never by sleeping.
"""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id
from structlog import get_logger

from backend.api.main import create_app
from backend.config import Settings
from backend.pipeline.executor import INTERNAL_MESSAGE
from backend.pipeline.phases import PHASE_NAMES, default_phases
from backend.pipeline.phases.base import Batch, Phase, RunContext
from backend.pipeline.phases.enrich import EnrichPhase
from backend.pipeline.phases.report import ReportPhase
from backend.pipeline.tape import generate_tape
from backend.tests.conftest import make_settings
from backend.tests.obs_helpers import events, json_lines
from backend.tests.pipeline_support import (
    DEADLINE_SECONDS,
    KNOWN_TAPE,
    upload_tape,
)

PHASE_SPANS = {f"pipeline.phase.{name}" for name in PHASE_NAMES}
SECRET = "hunter2-never-in-a-span"


@pytest.fixture
async def app(settings: Settings, exporter: InMemorySpanExporter) -> AsyncIterator[FastAPI]:
    # Overrides conftest's `app`: the same app, exporting its spans to `exporter`.
    application = create_app(settings, span_exporter=exporter)
    async with application.router.lifespan_context(application):
        yield application


async def upload_known_tape(
    client: httpx.AsyncClient, headers: dict[str, str], exporter: InMemorySpanExporter
) -> str:
    """Upload the hand-made tape, then forget the upload's spans: what follows is the run's."""
    path = await upload_tape(client, headers, "known.csv", KNOWN_TAPE)
    exporter.clear()
    return path


async def run_to_end(
    app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str], path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """POST the run, wait for its task to end (spans are exported by then); the 202 body
    and the run as GET returns it."""
    response = await client.post(
        "/api/pipeline/run",
        json={"input_path": path},
        headers={**headers, "X-Request-ID": "queue-the-run"},
    )
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    await asyncio.wait_for(app.state.runner.join(), DEADLINE_SECONDS)
    got = await client.get(f"/api/pipeline/runs/{accepted['run_id']}", headers=headers)
    assert got.status_code == 200, got.text
    return accepted, got.json()


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_trace_id(span.context.trace_id)


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_span_id(span.context.span_id)


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, sorted(s.name for s in spans))
    return found[0]


def run_trace(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one `pipeline.run` span and every span of its trace."""
    spans = list(exporter.get_finished_spans())
    root = only(spans, "pipeline.run")
    assert root.context is not None
    return root, [s for s in spans if s.context and s.context.trace_id == root.context.trace_id]


def post_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    return only(
        [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER],
        "POST /api/pipeline/run",
    )


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def tape(rows: int) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(generate_tape(rows, seed=3))
    return out.getvalue().encode()


async def test_a_run_is_one_trace_of_seven_phases_linked_to_its_request(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
) -> None:
    path = await upload_known_tape(client, analyst, exporter)
    accepted, run = await run_to_end(app, client, analyst, path)
    assert run["status"] == "completed", run

    root, spans = run_trace(exporter)
    assert root.parent is None
    # The root opens when the run was queued; its first child is the wait for an executor.
    wait = only(spans, "pipeline.queue.wait")
    assert wait.parent is not None and wait.parent.span_id == root.context.span_id
    assert root.start_time == wait.start_time
    assert wait.end_time is not None and wait.end_time <= min(
        s.start_time or 0 for s in spans if s.name.startswith("pipeline.phase.")
    )
    waited = attrs(wait)["pipeline.queue.wait_seconds"]
    assert waited == attrs(root)["pipeline.queue.wait_seconds"] >= 0
    phases = [s for s in spans if s.name.startswith("pipeline.phase.")]
    assert sorted(s.name for s in phases) == sorted(PHASE_SPANS)
    for phase in phases:
        assert phase.parent is not None and phase.parent.span_id == root.context.span_id
        assert phase.status.status_code == StatusCode.UNSET

    # A new trace, not the request's; linked to the request's server span, which names the run.
    request = post_span(exporter)
    assert hex_trace(request) != hex_trace(root)
    (link,) = root.links
    assert (link.context.trace_id, link.context.span_id) == (
        request.context.trace_id,
        request.context.span_id,
    )
    assert attrs(request)["pipeline.run_id"] == accepted["run_id"]
    assert attrs(request)["pipeline.run.trace_id"] == hex_trace(root)
    assert not [s for s in exporter.get_finished_spans() if s.name.startswith("pipeline.")
                and hex_trace(s) == hex_trace(request)]  # fmt: skip

    assert attrs(root) == {
        "pipeline.run_id": accepted["run_id"],
        "pipeline.attempt": 1,
        "pipeline.queue.wait_seconds": waited,
        "pipeline.input_path": path,
        "pipeline.status": "completed",
        "pipeline.loans.total": 14,
        "pipeline.loans.eligible": 4,
        "pipeline.loans.ineligible": 6,
        "pipeline.loans.rejected": 4,
        "pipeline.loans.exceptions": 12,
    }
    by_name = {s.name.removeprefix("pipeline.phase."): attrs(s) for s in phases}
    flow = {
        name: (a["pipeline.phase.rows_in"], a["pipeline.phase.rows_out"],
               a["pipeline.phase.exceptions"])
        for name, a in by_name.items()
    }  # fmt: skip
    assert flow == {
        "ingest": (0, 14, 0),
        "validate": (14, 10, 5),
        "normalize": (10, 10, 0),
        "enrich": (10, 10, 0),
        "eligibility": (10, 10, 7),
        "persist": (10, 10, 0),
        "report": (10, 10, 0),
    }
    assert all(a["pipeline.phase.busy_seconds"] >= 0 for a in by_name.values())

    # The stored trace id is the run's trace, in the 202 and in GET.
    assert accepted["trace_id"] == run["trace_id"] == hex_trace(root)


async def test_sql_spans_hang_under_the_phase_that_issued_them(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
) -> None:
    path = await upload_known_tape(client, analyst, exporter)
    _, run = await run_to_end(app, client, analyst, path)
    assert run["status"] == "completed", run

    root, spans = run_trace(exporter)
    persist = only(spans, "pipeline.phase.persist")
    sql = [s for s in spans if s.kind == trace.SpanKind.CLIENT]
    under_persist = [s for s in sql if s.parent and s.parent.span_id == persist.context.span_id]
    assert sorted(s.name for s in under_persist) == [
        "BEGIN",
        "COMMIT",
        "COPY loan_exceptions",
        "COPY loan_facts",
        "SELECT",  # the run is still this process's to commit (row lock)
    ]
    copy = only(under_persist, "COPY loan_facts")
    assert attrs(copy)["db.system"] == "postgresql"
    assert attrs(copy)["db.operation.batch.size"] == 10
    assert attrs(copy)["db.statement"].startswith("COPY loan_facts (run_id, row_number,")
    # Every other statement is the runner's status writes, directly under the run.
    for span in sql:
        if span not in under_persist:
            assert span.parent is not None and span.parent.span_id == root.context.span_id
            assert span.name.split()[0] in {"SELECT", "UPDATE"}, span.name


async def test_span_count_follows_batches_never_rows(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
) -> None:
    rows, batch_size = 600, 50
    app.state.runner.settings = app.state.runner.engine.settings = app.state.settings.model_copy(
        update={"PIPELINE_BATCH_SIZE": batch_size}
    )
    path = await upload_tape(client, analyst, "tape.csv", tape(rows))
    exporter.clear()
    _, run = await run_to_end(app, client, analyst, path)
    assert (run["status"], run["total_loans"]) == ("completed", rows), run

    _root, spans = run_trace(exporter)
    batches = attrs(only(spans, "pipeline.phase.ingest"))["pipeline.phase.batches"]
    assert rows // batch_size <= batches <= rows // batch_size + 1
    names = {s.name for s in spans}
    allowed = {"pipeline.run", "pipeline.queue.wait", *PHASE_SPANS, "BEGIN", "COMMIT",
               "COPY loan_facts", "COPY loan_exceptions"}  # fmt: skip
    assert all(n in allowed or n.split()[0] in {"SELECT", "UPDATE"} for n in names), names
    copies = [s for s in spans if s.name.startswith("COPY")]
    assert len(copies) <= 2 * batches
    # The run, seven phases, two COPYs per batch, BEGIN/COMMIT and a few status writes.
    assert len(spans) <= 1 + 7 + 2 * batches + 2 + 6
    assert len(spans) < rows / 10


async def test_run_log_lines_carry_run_id_and_the_runs_trace(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = await upload_known_tape(client, analyst, exporter)
    capsys.readouterr()
    accepted, _ = await run_to_end(app, client, analyst, path)
    after = await client.get("/api/pipeline/runs", headers=analyst)
    assert after.status_code == 200
    lines = json_lines(capsys.readouterr().out)

    root, _ = run_trace(exporter)
    in_run = [line for line in lines if line.get("run_id") == accepted["run_id"]]
    run_events = [line["event"] for line in in_run]
    assert "pipeline.run.started" in run_events
    assert "pipeline.run.completed" in run_events
    assert run_events.count("pipeline.phase.completed") == 7
    for line in in_run:
        assert line["trace_id"] == hex_trace(root), line
        assert line["xray_trace_id"] == f"1-{line['trace_id'][:8]}-{line['trace_id'][8:]}"
        assert len(line["span_id"]) == 16
        # The queueing request's log context stays with the request.
        assert "request_id" not in line and "user" not in line, line
    # Conversely, every line of the run's trace names the run.
    for line in lines:
        if line.get("trace_id") == hex_trace(root):
            assert line.get("run_id") == accepted["run_id"], line
    # ... and run_id never leaks into a request's lines.
    request = post_span(exporter)
    (queued,) = events(lines, "http.request.completed", request_id="queue-the-run")
    assert queued["trace_id"] == hex_trace(request)
    assert "run_id" not in queued
    for line in events(lines, "http.request.completed"):
        assert "run_id" not in line, line


class TracedEnrich(EnrichPhase):
    """Leaves a span and a log line from its transform, and takes at least 10 ms there."""

    threads: set[int]

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        self.threads.add(threading.get_ident())
        with trace.get_tracer("tests").start_as_current_span("enrich.probe"):
            get_logger("tests").info("enrich.probe", rows=len(batch.rows))
        time.sleep(0.01)
        super().transform(batch, ctx)


async def test_work_off_the_loop_keeps_its_phase_span_time_and_run_context(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    threads: set[int] = set()

    def phases() -> list[Phase]:
        chosen = default_phases()
        traced = TracedEnrich()
        traced.threads = threads
        chosen[PHASE_NAMES.index("enrich")] = traced
        return chosen

    app.state.runner.engine.phases = phases
    path = await upload_known_tape(client, analyst, exporter)
    capsys.readouterr()
    accepted, run = await run_to_end(app, client, analyst, path)
    assert run["status"] == "completed", run
    assert threads and threading.get_ident() not in threads

    root, spans = run_trace(exporter)
    enrich = only(spans, "pipeline.phase.enrich")
    probes = [s for s in spans if s.name == "enrich.probe"]
    assert len(probes) == attrs(enrich)["pipeline.phase.batches"]
    assert all(p.parent is not None and p.parent.span_id == enrich.context.span_id for p in probes)
    lines = events(json_lines(capsys.readouterr().out), "enrich.probe")
    assert len(lines) == len(probes)
    for line in lines:
        assert (line["run_id"], line["trace_id"]) == (accepted["run_id"], hex_trace(root))
    # The time a phase spends in the worker thread is still its own.
    assert attrs(enrich)["pipeline.phase.busy_seconds"] >= 0.01 * len(probes)
    assert run["phase_durations"]["enrich"] >= 0.01 * len(probes)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"TRACE_UI": "jaeger", "TRACE_UI_URL": "http://jaeger.internal:16686/"},
            "http://jaeger.internal:16686/trace/{trace_id}",
        ),
        (
            {"TRACE_UI": "xray", "AWS_REGION": "eu-west-2"},
            "https://eu-west-2.console.aws.amazon.com/cloudwatch/home?region=eu-west-2"
            "#xray:traces/1-{head}-{tail}",
        ),
    ],
)
async def test_run_api_returns_trace_id_and_trace_url(
    clean_db: str,
    tmp_path: Path,
    exporter: InMemorySpanExporter,
    overrides: dict[str, str],
    expected: str,
) -> None:
    settings = make_settings(
        DATABASE_URL=clean_db, STORAGE_LOCAL_ROOT=str(tmp_path / "storage"), **overrides
    )
    application = create_app(settings, span_exporter=exporter)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            from backend.tests.conftest import ADMIN_PASSWORD, bearer, login

            headers = bearer(await login(client, "admin", ADMIN_PASSWORD))
            path = await upload_tape(client, headers, "known.csv", KNOWN_TAPE)
            accepted, run = await run_to_end(application, client, headers, path)
            listed = await client.get("/api/pipeline/runs", headers=headers)

    root, _ = run_trace(exporter)
    trace_id = hex_trace(root)
    url = expected.format(trace_id=trace_id, head=trace_id[:8], tail=trace_id[8:])
    assert (accepted["trace_id"], accepted["trace_url"]) == (trace_id, url)
    assert (run["trace_id"], run["trace_url"]) == (trace_id, url)
    (item,) = listed.json()["items"]
    assert (item["trace_id"], item["trace_url"]) == (trace_id, url)


async def test_a_failing_phase_marks_its_span_and_the_run_span(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
) -> None:
    header, *rows = KNOWN_TAPE.decode().splitlines()
    short = "\n".join([header.replace(",credit_score", ""), *rows[:2]]) + "\n"
    path = await upload_tape(client, analyst, "short.csv", short.encode())
    exporter.clear()
    _, run = await run_to_end(app, client, analyst, path)
    message = "The tape is missing required columns: credit_score"
    assert (run["status"], run["error_message"]) == ("failed", message)

    root, spans = run_trace(exporter)
    validate = only(spans, "pipeline.phase.validate")
    assert validate.status.status_code == StatusCode.ERROR
    assert validate.status.description == message
    (event,) = [e for e in validate.events if e.name == "exception"]
    assert str((event.attributes or {})["exception.type"]).endswith("PipelineFailure")
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description == message
    assert attrs(root)["pipeline.status"] == "failed"
    # Ingest had started and is closed as aborted; later phases never started.
    ingest = only(spans, "pipeline.phase.ingest")
    assert ingest.status.status_code == StatusCode.UNSET
    assert attrs(ingest)["pipeline.phase.aborted"] is True
    assert {s.name for s in spans if s.name.startswith("pipeline.phase.")} == {
        "pipeline.phase.ingest",
        "pipeline.phase.validate",
    }


class BrokenReport(ReportPhase):
    """Fails inside the first batch, after persist has sent it, with a secret in the message."""

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        raise RuntimeError(f"cannot reach postgresql://loader:{SECRET}@db.internal/loans")


async def test_a_crashing_phase_is_an_error_span_without_secrets(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
) -> None:
    def phases() -> list[Phase]:
        return [*default_phases()[:-1], BrokenReport()]

    app.state.runner.engine.phases = phases
    path = await upload_known_tape(client, analyst, exporter)
    _, run = await run_to_end(app, client, analyst, path)
    assert (run["status"], run["error_message"]) == ("failed", INTERNAL_MESSAGE)

    root, spans = run_trace(exporter)
    report = only(spans, "pipeline.phase.report")
    assert report.status.status_code == StatusCode.ERROR
    assert report.status.description == "RuntimeError"
    (event,) = [e for e in report.events if e.name == "exception"]
    recorded = dict(event.attributes or {})
    assert str(recorded["exception.type"]).endswith("RuntimeError")
    assert "postgresql://loader:[REDACTED]@db.internal" in str(recorded["exception.message"])
    assert root.status.status_code == StatusCode.ERROR
    assert attrs(root)["pipeline.status"] == "failed"
    # Persist had sent the batch: it is closed as aborted, its transaction never committed.
    persist = only(spans, "pipeline.phase.persist")
    assert attrs(persist)["pipeline.phase.aborted"] is True
    assert persist.status.status_code == StatusCode.UNSET
    assert "COMMIT" not in {s.name for s in spans}
    # The clean-up of the run's rows is the runner's, under the run span.
    deletes = [s for s in spans if s.name.startswith("DELETE")]
    assert deletes
    assert all(s.parent and s.parent.span_id == root.context.span_id for s in deletes)
    for span in exporter.get_finished_spans():
        assert SECRET not in str(span.attributes), span.name
        assert SECRET not in str(span.status.description), span.name
        for span_event in span.events:
            assert SECRET not in str(span_event.attributes), span.name


async def test_concurrent_runs_keep_their_own_trace_and_run_id(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = await upload_known_tape(client, analyst, exporter)
    capsys.readouterr()
    accepted = []
    for _ in range(2):
        response = await client.post(
            "/api/pipeline/run", json={"input_path": path}, headers=analyst
        )
        assert response.status_code == 202
        accepted.append(response.json())
    await asyncio.wait_for(app.state.runner.join(), DEADLINE_SECONDS)
    lines = json_lines(capsys.readouterr().out)

    roots = {
        attrs(s)["pipeline.run_id"]: hex_trace(s)
        for s in exporter.get_finished_spans()
        if s.name == "pipeline.run"
    }
    assert set(roots) == {a["run_id"] for a in accepted}
    assert len(set(roots.values())) == 2
    for body in accepted:
        assert body["trace_id"] == roots[body["run_id"]]
        uuid.UUID(body["run_id"])
    for line in lines:
        if "run_id" in line:
            assert line["trace_id"] == roots[line["run_id"]], line


class HeldReport(ReportPhase):
    """Holds the run inside its first batch until it is cancelled."""

    reached: asyncio.Event

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        self.reached.set()
        await asyncio.Event().wait()


async def test_an_interrupted_run_still_ends_every_span(
    app: FastAPI,
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    exporter: InMemorySpanExporter,
) -> None:
    reached = asyncio.Event()

    def phases() -> list[Phase]:
        held = HeldReport()
        held.reached = reached
        return [*default_phases()[:-1], held]

    app.state.runner.engine.phases = phases
    path = await upload_known_tape(client, analyst, exporter)
    response = await client.post("/api/pipeline/run", json={"input_path": path}, headers=analyst)
    assert response.status_code == 202
    await asyncio.wait_for(reached.wait(), DEADLINE_SECONDS)
    assert not [s for s in exporter.get_finished_spans() if s.name == "pipeline.run"]
    await app.state.runner.shutdown(drain_seconds=0)

    root, spans = run_trace(exporter)
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description == "handed back: the process is stopping"
    assert attrs(root)["pipeline.status"] == "handed_back"
    phases_ended = {s.name: s for s in spans if s.name.startswith("pipeline.phase.")}
    assert set(phases_ended) == PHASE_SPANS
    assert phases_ended["pipeline.phase.report"].status.status_code == StatusCode.ERROR
    assert all(attrs(s)["pipeline.phase.aborted"] is True for s in phases_ended.values())
