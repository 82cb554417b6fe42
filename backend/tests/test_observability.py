"""Observability: JSON log lines, spans, their shared ids, slow SQL, export, ALB ids.

Spans come from an InMemorySpanExporter injected with `create_app(span_exporter=...)`;
log lines are the JSON objects actually written to stdout. PostgreSQL is real.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import yaml
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id
from sqlalchemy import text

from backend.api.main import create_app
from backend.config import Settings
from backend.observability import instrumentation, span_export, trace_ids
from backend.observability.logging_config import configure_logging
from backend.observability.metrics import (
    HTTP_DURATION,
    AdminMetrics,
    percentile_from_buckets,
)
from backend.tests.conftest import (
    ADMIN_PASSWORD,
    TEST_SECRET,
    UserFactory,
    bearer,
    login,
    make_settings,
)
from backend.tests.obs_helpers import (
    OtlpReceiver,
    Uvicorn,
    events,
    free_port,
    json_lines,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


def add_test_routes(app: FastAPI) -> None:
    """Routes only the tests need: a crash, a slow statement, health-like paths."""

    @app.get("/api/test/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    @app.get("/api/test/sleep")
    async def sleep(seconds: float = 0.2) -> dict[str, str]:
        async with app.state.db.session() as session:
            await session.execute(
                text("SELECT pg_sleep(:seconds), :marker"),
                {"seconds": seconds, "marker": "param-value-never-logged"},
            )
        return {"status": "slept"}

    @app.get("/api/healthcare")
    async def healthcare() -> dict[str, str]:
        return {"status": "care"}

    @app.get("/api/health")
    async def api_health() -> dict[str, str]:
        return {"status": "not a probe"}


@asynccontextmanager
async def running(
    settings: Settings, exporter: InMemorySpanExporter | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    application = create_app(settings, span_exporter=exporter)
    add_test_routes(application)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application, client=("198.51.100.7", 4000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield application, c


@pytest.fixture
async def app(settings: Settings, exporter: InMemorySpanExporter) -> AsyncIterator[FastAPI]:
    # Overrides conftest's `app`: the same app, plus the test routes and an exporter.
    application = create_app(settings, span_exporter=exporter)
    add_test_routes(application)
    async with application.router.lifespan_context(application):
        yield application


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_trace_id(span.context.trace_id)


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_span_id(span.context.span_id)


def server_span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [
        s
        for s in exporter.get_finished_spans()
        if s.name == name and s.kind == trace.SpanKind.SERVER
    ]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


class TestRequestTrace:
    async def test_access_line_shares_trace_with_server_span_and_sql_children(
        self,
        client: httpx.AsyncClient,
        exporter: InMemorySpanExporter,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        token = await login(client, "admin", ADMIN_PASSWORD)
        exporter.clear()
        capsys.readouterr()

        response = await client.get(
            "/api/auth/me", headers={**bearer(token), "X-Request-ID": "trace-me-1"}
        )
        assert response.status_code == 200

        span = server_span(exporter, "GET /api/auth/me")
        assert span.attributes is not None
        assert span.attributes["request.id"] == "trace-me-1"
        assert span.attributes["enduser.id"] == str(response.json()["id"])
        sql = [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]
        assert sql, "no SQL spans"
        for statement in sql:
            assert statement.parent is not None
            assert statement.parent.span_id == span.context.span_id
            assert hex_trace(statement) == hex_trace(span)
        # asyncpg is not instrumented as well: one span per statement, each a SQLAlchemy one.
        assert {s.instrumentation_scope.name for s in sql} == {  # type: ignore[union-attr]
            "opentelemetry.instrumentation.sqlalchemy"
        }

        (line,) = events(json_lines(capsys.readouterr().out), "http.request.completed")
        assert line["trace_id"] == hex_trace(span)
        assert line["span_id"] == hex_span(span)
        assert line["xray_trace_id"] == f"1-{line['trace_id'][:8]}-{line['trace_id'][8:]}"
        assert line["request_id"] == "trace-me-1"
        assert line["user"] == "admin"
        assert line["user_id"] == response.json()["id"]
        assert line["route"] == "/api/auth/me"
        assert line["path"] == "/api/auth/me"
        assert line["status_code"] == 200
        assert line["method"] == "GET"
        assert line["client_ip"] == "203.0.113.10"
        assert line["user_agent"].startswith("python-httpx")
        assert line["response_bytes"] == len(response.content)
        assert line["duration_ms"] >= 0
        assert line["level"] == "info"
        assert line["logger"] == "backend.access"
        assert line["service"] == "loan-engine"
        assert line["environment"] == "test"
        assert line["version"] == "0.1.0"
        assert line["timestamp"].endswith("Z")

    async def test_engine_is_instrumented_once(
        self, app: FastAPI, exporter: InMemorySpanExporter
    ) -> None:
        # A second call must not double spans.
        instrumentation.instrument_engine(app.state.db.engine)
        exporter.clear()
        async with app.state.db.session() as session:
            assert (await session.execute(text("SELECT 4242"))).scalar() == 4242
        spans = [s for s in exporter.get_finished_spans() if "4242" in str(s.attributes)]
        assert len(spans) == 1

    async def test_span_names_are_route_templates(
        self,
        client: httpx.AsyncClient,
        admin_headers: dict[str, str],
        exporter: InMemorySpanExporter,
    ) -> None:
        exporter.clear()
        response = await client.patch(
            "/api/users/987654", json={"role": "analyst"}, headers=admin_headers
        )
        assert response.status_code == 404
        server_span(exporter, "PATCH /api/users/{user_id}")
        # No http receive/send sub-spans.
        assert not [s for s in exporter.get_finished_spans() if "http send" in s.name]
        assert not [s for s in exporter.get_finished_spans() if "http receive" in s.name]

    async def test_concurrent_requests_never_mix_context(
        self,
        client: httpx.AsyncClient,
        make_user: UserFactory,
        exporter: InMemorySpanExporter,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        alice = await make_user(username="alice")
        bob = await make_user(username="bob")
        capsys.readouterr()
        # A context left over in the caller must not reach any request.
        structlog.contextvars.bind_contextvars(user="intruder", request_id="stale")
        expected: dict[str, str | None] = {}
        calls = []
        for n in range(36):
            who = (alice, bob, None)[n % 3]
            request_id = f"concurrent-{n}"
            expected[request_id] = who["username"] if who else None
            headers = {"X-Request-ID": request_id, **(who["headers"] if who else {})}
            calls.append(client.get("/api/auth/me", headers=headers))
        try:
            responses = await asyncio.gather(*calls)
        finally:
            structlog.contextvars.clear_contextvars()
        for response in responses:
            request_id = response.headers["x-request-id"]
            assert response.status_code == (200 if expected[request_id] else 401)

        lines = [line for line in json_lines(capsys.readouterr().out) if "request_id" in line]
        access = events(lines, "http.request.completed")
        assert sorted(line["request_id"] for line in access) == sorted(expected)
        trace_of: dict[str, str] = {}
        for line in lines:
            request_id = line["request_id"]
            assert request_id in expected, line
            if line["event"] == "http.request.completed":
                assert line.get("user") == expected[request_id], line
            else:
                # A line written before the token is verified (a slow query of the user
                # lookup on a loaded machine) has no user yet, but never someone else's.
                assert line.get("user") in (expected[request_id], None), line
            # One trace per request, the same on every line of that request.
            assert trace_of.setdefault(request_id, line["trace_id"]) == line["trace_id"]
        assert len(set(trace_of.values())) == len(expected)
        spans = {
            format_trace_id(s.context.trace_id)
            for s in exporter.get_finished_spans()
            if s.name == "GET /api/auth/me"
        }
        assert spans == set(trace_of.values())


class TestExcludedUrls:
    async def test_health_urls_make_no_spans_but_lookalikes_do(
        self,
        client: httpx.AsyncClient,
        exporter: InMemorySpanExporter,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        exporter.clear()
        capsys.readouterr()
        for path in ("/health", "/health/", "/health/live", "/health/ready", "/metrics"):
            response = await client.get(path)
            assert "x-request-id" in response.headers
        assert exporter.get_finished_spans() == ()

        assert (await client.get("/api/healthcare")).status_code == 200
        assert (await client.get("/api/health")).status_code == 200
        assert (await client.get("/health?x=1")).status_code == 200
        names = sorted(s.name for s in exporter.get_finished_spans())
        assert names == ["GET /api/health", "GET /api/healthcare"]

        access = events(json_lines(capsys.readouterr().out), "http.request.completed")
        # The successful probe is not logged at info; the lookalikes are.
        assert sorted(line["path"] for line in access if line["status_code"] == 200) == [
            "/api/health",
            "/api/healthcare",
        ]


class TestErrors:
    async def test_500_is_an_error_span_with_the_exception_and_a_log_line(
        self,
        client: httpx.AsyncClient,
        exporter: InMemorySpanExporter,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        capsys.readouterr()
        response = await client.get("/api/test/boom", headers={"X-Request-ID": "boom-1"})
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "boom-1"
        assert response.headers["server-timing"].startswith("total;dur=")
        body = response.json()["error"]
        assert body["code"] == "internal_error"
        assert "kaboom" not in response.text

        span = server_span(exporter, "GET /api/test/boom")
        assert span.status.status_code == StatusCode.ERROR
        (event,) = [e for e in span.events if e.name == "exception"]
        assert event.attributes is not None
        assert event.attributes["exception.type"] == "RuntimeError"
        assert event.attributes["exception.message"] == "kaboom"
        assert body["trace_id"] == hex_trace(span)

        lines = json_lines(capsys.readouterr().out)
        (error,) = events(lines, "http.unhandled_exception")
        assert error["level"] == "error"
        assert error["trace_id"] == hex_trace(span)
        assert error["request_id"] == "boom-1"
        assert error["exception"][0]["exc_type"] == "RuntimeError"
        (access,) = events(lines, "http.request.completed")
        assert access["status_code"] == 500
        assert access["level"] == "error"
        assert access["trace_id"] == hex_trace(span)
        # Logged once, structured: no second, plain traceback from the server.
        assert "Traceback" not in capsys.readouterr().err


class TestSlowQueries:
    async def test_slow_statement_gives_span_event_and_warning(
        self,
        settings: Settings,
        exporter: InMemorySpanExporter,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        slow = settings.model_copy(update={"DB_SLOW_QUERY_MS": 50})
        async with running(slow, exporter) as (_, client):
            capsys.readouterr()
            response = await client.get("/api/test/sleep", params={"seconds": 0.2})
            assert response.status_code == 200
            fast = await client.get("/api/test/sleep", params={"seconds": 0})
            assert fast.status_code == 200
        output = capsys.readouterr().out

        sql = [
            s
            for s in exporter.get_finished_spans()
            if s.kind == trace.SpanKind.CLIENT and "pg_sleep" in str(s.attributes)
        ]
        assert len(sql) == 2
        slow_spans = [s for s in sql if any(e.name == "db.slow_query" for e in s.events)]
        assert len(slow_spans) == 1
        (event,) = [e for e in slow_spans[0].events if e.name == "db.slow_query"]
        assert event.attributes is not None
        assert "pg_sleep" in str(event.attributes["statement"])
        assert float(event.attributes["duration_ms"]) >= 200  # type: ignore[arg-type]
        assert event.attributes["threshold_ms"] == 50

        (line,) = events(json_lines(output), "db.slow_query")
        assert line["level"] == "warning"
        assert line["statement"] == event.attributes["statement"]
        assert line["duration_ms"] == event.attributes["duration_ms"]
        assert line["threshold_ms"] == 50
        assert line["trace_id"] == hex_trace(slow_spans[0])
        assert line["span_id"] == hex_span(slow_spans[0])
        assert "param-value-never-logged" not in output
        assert "param-value-never-logged" not in str(event.attributes)

    async def test_statement_is_cut_to_1000_chars(
        self,
        settings: Settings,
        exporter: InMemorySpanExporter,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        every = settings.model_copy(update={"DB_SLOW_QUERY_MS": 0})
        async with running(every, exporter) as (application, _):
            padding = "x" * 3000
            async with application.state.db.session() as session:
                await session.execute(text(f"SELECT pg_sleep(0.01) /* {padding} */"))
        lines = events(json_lines(capsys.readouterr().out), "db.slow_query")
        long_ones = [line for line in lines if padding[:100] in line["statement"]]
        assert long_ones and all(len(line["statement"]) == 1000 for line in long_ones)


class TestAlb:
    async def test_root_only_header_becomes_the_trace_id(
        self,
        client: httpx.AsyncClient,
        exporter: InMemorySpanExporter,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        capsys.readouterr()
        root = "1-5759e988-bd862e3fe1be46a994272793"
        response = await client.get(
            "/api/healthcare",
            headers={"X-Amzn-Trace-Id": f"Self=1-aaaaaaaa-{'b' * 24};Root={root}"},
        )
        assert response.status_code == 200
        span = server_span(exporter, "GET /api/healthcare")
        assert hex_trace(span) == "5759e988bd862e3fe1be46a994272793"
        assert span.parent is None
        (line,) = events(json_lines(capsys.readouterr().out), "http.request.completed")
        assert line["alb_trace_id"] == root
        assert line["xray_trace_id"] == root
        assert line["trace_id"] == "5759e988bd862e3fe1be46a994272793"

    async def test_traceparent_wins_over_alb_root(
        self, client: httpx.AsyncClient, exporter: InMemorySpanExporter
    ) -> None:
        parent_trace = "0af7651916cd43dd8448eb211c80319c"
        response = await client.get(
            "/api/healthcare",
            headers={
                "traceparent": f"00-{parent_trace}-b7ad6b7169203331-01",
                "X-Amzn-Trace-Id": "Root=1-5759e988-bd862e3fe1be46a994272793",
            },
        )
        assert response.status_code == 200
        assert hex_trace(server_span(exporter, "GET /api/healthcare")) == parent_trace

    async def test_next_request_without_header_gets_a_fresh_xray_id(
        self, client: httpx.AsyncClient, exporter: InMemorySpanExporter
    ) -> None:
        await client.get(
            "/api/healthcare", headers={"X-Amzn-Trace-Id": "Root=1-5759e988-" + "1" * 24}
        )
        exporter.clear()
        await client.get("/api/healthcare")
        trace_id = hex_trace(server_span(exporter, "GET /api/healthcare"))
        assert not trace_id.startswith("5759e988")
        # X-Ray ids start with the epoch seconds of their creation.
        assert abs(int(trace_id[:8], 16) - time.time()) < 600


class TestOtlpExport:
    async def test_spans_reach_a_real_otlp_http_receiver(self, settings: Settings) -> None:
        with OtlpReceiver() as receiver:
            otlp = settings.model_copy(
                update={
                    "OTEL_TRACES_EXPORTER": "otlp",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                }
            )
            async with running(otlp) as (_, client):
                assert (await client.get("/api/healthcare")).status_code == 200
                assert (await client.get("/api/auth/me")).status_code == 401
            # Shutdown flushed the batch: the spans are there without waiting.
            names = {span.name for _, span in receiver.spans()}
            resources = [resource for resource, _ in receiver.spans()]
        assert {"GET /api/healthcare", "GET /api/auth/me"} <= names
        assert resources[0]["service.name"] == "loan-engine"
        assert resources[0]["deployment.environment"] == "test"
        assert resources[0]["service.instance.id"]

    async def test_only_the_signal_specific_traces_endpoint_is_enough(
        self, settings: Settings, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is the full URL (the spec's rule), used as
        given, with no base endpoint set at all."""
        with OtlpReceiver() as receiver:
            monkeypatch.setenv(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{receiver.endpoint}/v1/traces"
            )
            otlp = settings.model_copy(
                update={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
            )
            async with running(otlp) as (_, client):
                assert (await client.get("/api/healthcare")).status_code == 200
            names = {span.name for _, span in receiver.spans()}
        assert "GET /api/healthcare" in names

    def test_signal_specific_protocol_wins(self, monkeypatch: pytest.MonkeyPatch) -> None:
        base = make_settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
        assert "grpc" in type(span_export.build_span_exporter(base)).__module__
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
        grpc_base = make_settings(
            OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318", OTEL_EXPORTER_OTLP_PROTOCOL="grpc"
        )
        assert "http" in type(span_export.build_span_exporter(grpc_base)).__module__

    async def test_dead_collector_neither_fails_requests_nor_hangs_shutdown(
        self, settings: Settings
    ) -> None:
        dead = settings.model_copy(
            update={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
                "OTEL_SHUTDOWN_TIMEOUT_SECONDS": 1.0,
            }
        )
        application = create_app(dead)
        add_test_routes(application)
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for _ in range(5):
                    assert (await client.get("/api/healthcare")).status_code == 200
            started = time.monotonic()
            tracing_state = application.state.tracing
        # The lifespan exit above ran the bounded shutdown; time it again directly too.
        elapsed_total = time.monotonic() - started
        assert elapsed_total < 1.0 + 2.0
        assert tracing_state.processor is None

    def test_shutdown_bound_holds_with_a_stuck_exporter(self) -> None:
        class StuckExporter(InMemorySpanExporter):
            def export(self, spans: Any) -> Any:
                time.sleep(30)  # a collector that never answers
                return super().export(spans)

        settings = make_settings(OTEL_SHUTDOWN_TIMEOUT_SECONDS=0.5)
        handle = span_export.Tracing(settings)
        handle.start()
        # Batch export through the real BatchSpanProcessor, stuck in export.
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(StuckExporter())
        handle.processor = processor
        span_export._router.add(processor)
        with trace.get_tracer("test").start_as_current_span("stuck"):
            pass
        started = time.monotonic()
        assert handle.shutdown() is False
        assert time.monotonic() - started < 1.5


class TestWorkers:
    def test_two_uvicorn_workers_both_export_spans(self, clean_db: str) -> None:
        with OtlpReceiver() as receiver:
            env = {
                "ENVIRONMENT": "test",
                "SECRET_KEY": TEST_SECRET,
                "DATABASE_URL": clean_db,
                "ADMIN_PASSWORD": ADMIN_PASSWORD,
                "BCRYPT_ROUNDS": "4",
                "RATE_LIMIT_ENABLED": "false",
                "DB_POOL_SIZE": "2",
                "DB_MAX_OVERFLOW": "0",
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            }
            with Uvicorn(env, workers=2) as server:

                def instances() -> set[str]:
                    return {
                        resource["service.instance.id"]
                        for resource, span in receiver.spans()
                        if span.name == "GET /api/auth/me"
                    }

                def both_workers_exported() -> bool:
                    # A new connection each time: the kernel spreads them over the workers.
                    response = httpx.get(f"{server.base_url}/api/auth/me", timeout=5)
                    assert response.status_code == 401
                    return len(instances()) >= 2

                wait_until(both_workers_exported, 60, "spans from two worker processes")
        lines = json_lines(server.output)
        assert len(events(lines, "app.started")) == 2  # one lifespan per worker
        assert events(lines, "http.request.completed", route="/api/auth/me", status_code=401)


class TestLogging:
    def test_sensitive_keys_and_url_credentials_are_redacted_at_any_depth(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging(make_settings())
        log = structlog.get_logger("backend.tests.redaction")
        secrets = {
            "password": "pw-value-1",
            "new_password": "pw-value-2",
            "secret": "secret-value-3",
            "client_secret": "secret-value-4",
            "token": "token-value-5",
            "access_token": "token-value-6",
            "authorization": "Bearer token-value-7",
            "Cookie": "session=cookie-value-8",
            "api_key": "key-value-9",
            "X-Api-Key": "key-value-10",
        }
        capsys.readouterr()
        for key, value in secrets.items():
            log.info("redaction.flat", **{key: value})
        log.info("redaction.nested", outer={"inner": [{"deep": dict(secrets)}]})
        log.info(
            "redaction.urls",
            dsn="postgresql+asyncpg://loan:dsn-pass-11@db.internal:5432/loans",
            url="https://token-value-12@github.com/org/repo.git",
            query="https://api.example.com/v1?user=jo&api_key=key-value-13&x=1",
            headers=[(b"authorization", b"Bearer token-value-14"), (b"accept", b"*/*")],
        )
        logging.getLogger("sqlalchemy.pool").warning(
            "cannot connect to postgresql://loan:dsn-pass-15@db/loans"
        )
        try:
            raise ValueError("bad dsn postgresql://loan:dsn-pass-16@db/loans")
        except ValueError:
            log.exception("redaction.exception")
        output = capsys.readouterr().out
        markers = [*secrets.values(), "dsn-pass-11", "token-value-12", "key-value-13"]
        markers += ["token-value-14", "dsn-pass-15", "dsn-pass-16"]
        for marker in markers:
            assert marker not in output, marker
        lines = json_lines(output)
        assert len(events(lines, "redaction.flat")) == len(secrets)
        for line in events(lines, "redaction.flat"):
            (key,) = set(line) & set(secrets)
            assert line[key] == "[REDACTED]"
        (urls,) = events(lines, "redaction.urls")
        assert urls["dsn"] == "postgresql+asyncpg://loan:[REDACTED]@db.internal:5432/loans"
        assert urls["query"] == "https://api.example.com/v1?user=jo&api_key=[REDACTED]&x=1"
        assert urls["headers"][1] == ["accept", "*/*"]

    def test_stdlib_lines_have_the_same_shape_and_trace_ids(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging(make_settings())
        span_export.Tracing(make_settings()).start()
        capsys.readouterr()
        structlog.contextvars.bind_contextvars(request_id="stdlib-1")
        try:
            with trace.get_tracer("test").start_as_current_span("outer") as span:
                logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
                logging.getLogger("asyncpg.pool").warning("pool %s", "busy")
                structlog.get_logger("backend.x").info("native.line", n=1)
        finally:
            structlog.contextvars.clear_contextvars()
        # (Other threads, e.g. an exporter still retrying from an earlier test, may write too.)
        lines = [
            line
            for line in json_lines(capsys.readouterr().out)
            if line.get("request_id") == "stdlib-1"
        ]
        assert [line["event"] for line in lines] == [
            "Started server process [42]",
            "pool busy",
            "native.line",
        ]  # one line each: no duplicates through server handlers
        ctx = span.get_span_context()
        for line in lines:
            assert line["trace_id"] == format_trace_id(ctx.trace_id)
            assert line["span_id"] == format_span_id(ctx.span_id)
            assert line["request_id"] == "stdlib-1"
            assert {"timestamp", "level", "logger", "service", "environment"} <= set(line)
        assert lines[0]["logger"] == "uvicorn.error"
        assert lines[1]["level"] == "warning"

    def test_library_noise_levels(self) -> None:
        configure_logging(make_settings())
        for name in ("uvicorn.access", "sqlalchemy.engine", "httpx", "botocore"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
        configure_logging(make_settings(DB_ECHO_QUERIES=True))
        assert logging.getLogger("sqlalchemy.engine").getEffectiveLevel() == logging.INFO
        configure_logging(make_settings())
        assert logging.getLogger("sqlalchemy.engine").getEffectiveLevel() == logging.WARNING

    def test_filtered_out_call_does_no_formatting_work(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        rendered: list[str] = []

        class Expensive:
            def __str__(self) -> str:
                rendered.append("str")
                return "expensive"

        configure_logging(make_settings(LOG_LEVEL="INFO"))
        log = structlog.get_logger("backend.tests.filter")
        log.debug("filtered.out", value=Expensive())
        assert rendered == []
        assert "filtered.out" not in capsys.readouterr().out
        log.info("kept", value=Expensive())
        assert rendered == ["str"]
        assert events(json_lines(capsys.readouterr().out), "kept")[0]["value"] == "expensive"

    def test_cached_loggers_outside_tests_render_the_same(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        configure_logging(make_settings(ENVIRONMENT="production"))
        try:
            log = structlog.get_logger("backend.tests.cached")
            capsys.readouterr()
            log.info("cached.first", n=1)
            log.debug("cached.filtered")
            log.info("cached.second", token="t-123")
            lines = json_lines(capsys.readouterr().out)
        finally:
            configure_logging(make_settings())
        assert [line["event"] for line in lines if line["logger"] == "backend.tests.cached"] == [
            "cached.first",
            "cached.second",
        ]
        (second,) = events(lines, "cached.second")
        assert second["token"] == "[REDACTED]"
        assert second["environment"] == "production"

    def test_text_format_and_no_timestamp(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure_logging(make_settings(LOG_FORMAT="text", LOG_INCLUDE_TIMESTAMP=False))
        try:
            capsys.readouterr()
            structlog.get_logger("backend.tests.text").warning("text.line", password="pw-x")
            output = capsys.readouterr().out
            assert "text.line" in output
            assert not output.lstrip().startswith("{")
            assert "pw-x" not in output
            configure_logging(make_settings(LOG_INCLUDE_TIMESTAMP=False))
            structlog.get_logger("backend.tests.text").warning("json.line")
            (line,) = events(json_lines(capsys.readouterr().out), "json.line")
            assert "timestamp" not in line
        finally:
            configure_logging(make_settings())

    def test_python_warnings_become_log_lines(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        configure_logging(make_settings())
        capsys.readouterr()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # pytest records warnings per test by replacing warnings.showwarning; hand
            # it back to logging for this block, as configure_logging does in a process.
            logging.captureWarnings(False)
            logging.captureWarnings(True)
            # The development key is generated (and the warning issued) once per file.
            Settings(_env_file=None, ENVIRONMENT="development", SECRET_KEY_FILE=str(tmp_path / "k"))
        lines = [
            line for line in json_lines(capsys.readouterr().out) if "SECRET_KEY" in line["event"]
        ]
        assert lines and lines[0]["logger"] == "py.warnings"
        assert lines[0]["level"] == "warning"

    def test_settings_warnings_before_logging_come_out_as_log_lines(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        import warnings

        from backend import config

        monkeypatch.setattr(
            config,
            "get_settings",
            lambda: Settings(
                _env_file=None, ENVIRONMENT="development", SECRET_KEY_FILE=str(tmp_path / "k")
            ),
        )
        monkeypatch.setattr("backend.api.main.get_settings", config.get_settings)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(False)  # see test_python_warnings_become_log_lines
            logging.captureWarnings(True)
            capsys.readouterr()
            try:
                create_app()
            finally:
                output = capsys.readouterr().out
                configure_logging(make_settings())
        lines = [line for line in json_lines(output) if "SECRET_KEY" in line["event"]]
        assert len(lines) == 1
        assert lines[0]["environment"] == "development"


class TestTracingHelpers:
    def test_trace_url(self) -> None:
        trace_id = "5759e988bd862e3fe1be46a994272793"
        jaeger = make_settings(TRACE_UI="jaeger", TRACE_UI_URL="http://jaeger:16686/")
        assert trace_ids.trace_url(jaeger, trace_id) == f"http://jaeger:16686/trace/{trace_id}"
        xray = make_settings(TRACE_UI="xray", AWS_REGION="eu-west-1")
        assert trace_ids.trace_url(xray, trace_id) == (
            "https://eu-west-1.console.aws.amazon.com/cloudwatch/home?region=eu-west-1"
            "#xray:traces/1-5759e988-bd862e3fe1be46a994272793"
        )

    def test_xray_id_round_trip(self) -> None:
        trace_id = 0x5759E988BD862E3FE1BE46A994272793
        assert trace_ids.xray_trace_id(trace_id) == "1-5759e988-bd862e3fe1be46a994272793"
        assert trace_ids.trace_id_from_xray("1-5759e988-bd862e3fe1be46a994272793") == trace_id
        for bad in (
            "",
            "1-5759e988",
            "2-5759e988-bd862e3fe1be46a994272793",
            "1-zz59e988-" + "0" * 24,
        ):
            assert trace_ids.trace_id_from_xray(bad) is None

    def test_resource_honours_settings_and_resource_attributes(self) -> None:
        settings = make_settings(
            OTEL_SERVICE_NAME="loans-api",
            OTEL_RESOURCE_ATTRIBUTES="aws.log.group.names=/ecs/loan-engine,service.name=ignored",
        )
        attributes = span_export.build_resource(settings).attributes
        assert attributes["service.name"] == "loans-api"
        assert attributes["aws.log.group.names"] == "/ecs/loan-engine"
        assert attributes["deployment.environment"] == "test"
        assert attributes["service.version"] == "0.1.0"
        other = span_export.build_resource(settings).attributes
        assert attributes["service.instance.id"] != other["service.instance.id"]

    def test_sampler_and_propagators_from_settings(self) -> None:
        ratio = make_settings(OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG=0.25)
        assert "0.25" in span_export.build_sampler(ratio).get_description()
        assert "ParentBased" in span_export.build_sampler(make_settings()).get_description()
        propagator = trace_ids.build_propagator(make_settings().OTEL_PROPAGATORS)
        assert {"traceparent", "baggage", "X-Amzn-Trace-Id"} <= propagator.fields
        with pytest.raises(ValueError, match="nope"):
            trace_ids.build_propagator(["tracecontext", "nope"])
        assert make_settings(OTEL_PROPAGATORS="tracecontext, xray").OTEL_PROPAGATORS == [
            "tracecontext",
            "xray",
        ]

    def test_exporter_choice(self) -> None:
        assert span_export.build_span_exporter(make_settings()) is None  # no endpoint
        assert span_export.build_span_processor(make_settings()) is None
        none = make_settings(
            OTEL_TRACES_EXPORTER="none", OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318"
        )
        assert span_export.build_span_exporter(none) is None
        grpc = make_settings(
            OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4317", OTEL_EXPORTER_OTLP_PROTOCOL="grpc"
        )
        assert "grpc" in type(span_export.build_span_exporter(grpc)).__module__
        http = make_settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318/")
        exporter = span_export.build_span_exporter(http)
        assert "http" in type(exporter).__module__
        assert exporter._endpoint == "http://c:4318/v1/traces"  # type: ignore[union-attr]
        console = make_settings(OTEL_TRACES_EXPORTER="console")
        assert type(span_export.build_span_exporter(console)).__name__ == "ConsoleSpanExporter"


class TestDeployFiles:
    def test_collector_configs_parse_and_wire_pipelines(self) -> None:
        dev = yaml.safe_load((ROOT / "otel-collector/config.dev.yaml").read_text())
        aws = yaml.safe_load((ROOT / "otel-collector/config.aws.yaml").read_text())
        for config in (dev, aws):
            assert {"grpc", "http"} <= set(config["receivers"]["otlp"]["protocols"])
            for pipeline in config["service"]["pipelines"].values():
                for stage in ("receivers", "processors", "exporters"):
                    for name in pipeline.get(stage, []):
                        assert name in config[stage], (stage, name)
        assert dev["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]
        assert "awsxray" in aws["service"]["pipelines"]["traces"]["exporters"]
        assert "awsemf" in aws["service"]["pipelines"]["metrics"]["exporters"]

    def test_compose_file_parses(self) -> None:
        compose = yaml.safe_load((ROOT / "docker-compose.observability.yml").read_text())
        assert {"otel-collector", "jaeger"} <= set(compose["services"])
        for service in compose["services"].values():
            assert "healthcheck" in service

    def test_every_observability_setting_is_documented(self) -> None:
        names = [
            name
            for name in Settings.model_fields
            if name.startswith(("OTEL_", "TRACE_", "LOG_")) or name == "AWS_REGION"
        ]
        assert len(names) >= 15
        env_example = (ROOT / ".env.example").read_text()
        readme = (ROOT / "README.md").read_text()
        for name in names:
            assert f"\n{name}=" in env_example, name
            assert f"| `{name}` |" in readme, name


# ------------------------------------------------------------- metrics and admin


class Recorder:
    """Instruments of a private MeterProvider, under the names the service records,
    and the admin view reading them."""

    def __init__(self) -> None:
        reader = InMemoryMetricReader()
        meter = MeterProvider(metric_readers=[reader]).get_meter("test")
        self.http = meter.create_histogram(
            HTTP_DURATION,
            unit="s",
            explicit_bucket_boundaries_advisory=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
        )
        self.runs = meter.create_counter("loan_engine.pipeline.runs")
        self.loans = meter.create_counter("loan_engine.pipeline.loans")
        self.view = AdminMetrics(reader)

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        attributes: dict[str, str | int] = {
            "http.request.method": method,
            "http.route": route,
            "http.response.status_code": status,
        }
        self.http.record(seconds, attributes)


class TestMetrics:
    def test_requests_by_route_and_status(self) -> None:
        recorder = Recorder()
        recorder.request("GET", "/api/users", 200, 0.0125)
        recorder.request("GET", "/api/users", 404, 0.003)
        recorder.request("POST", "/api/auth/login", 401, 0.04)
        snap = recorder.view.snapshot()
        assert snap["requests"]["total"] == 3
        assert snap["requests"]["window"] == 3
        assert snap["status_codes"] == {"200": 1, "401": 1, "404": 1}
        assert snap["top_routes"] == {"GET /api/users": 2, "POST /api/auth/login": 1}
        assert snap["scope"]["covers"] == "this process"

    def test_error_rate_counts_only_5xx(self) -> None:
        recorder = Recorder()
        for status in (200, 200, 500, 503, 404, 200, 200, 200):
            recorder.request("GET", "/x", status, 0.001)
        requests = recorder.view.snapshot()["requests"]
        assert requests["errors_total"] == 2
        assert requests["error_rate"] == 25.0

    def test_latency_percentiles_come_from_the_histogram_buckets(self) -> None:
        recorder = Recorder()
        for ms in range(1, 101):  # 1..100 ms
            recorder.request("GET", "/x", 200, ms / 1000)
        latency = recorder.view.snapshot()["latency_ms"]
        assert latency["samples"] == 100
        assert latency["max"] == 100.0
        # Estimated within the bucket that holds the true value (25-50 ms, 50-100 ms).
        assert 25.0 <= latency["p50"] <= 50.0
        assert 50.0 <= latency["p95"] <= 100.0 and 50.0 <= latency["p99"] <= 100.0
        assert latency["p50"] < latency["p95"] <= latency["p99"]

    def test_percentile_from_buckets(self) -> None:
        bounds = (1.0, 2.0, 4.0)
        assert percentile_from_buckets(bounds, [0, 0, 0, 0], 0.5) == 0.0
        assert percentile_from_buckets(bounds, [0, 10, 0, 0], 0.5) == 1.5
        assert percentile_from_buckets(bounds, [5, 0, 5, 0], 0.75) == 3.0
        assert percentile_from_buckets(bounds, [0, 0, 0, 3], 0.99) == 4.0  # +Inf: lower bound

    def test_pipeline_runs_and_loans(self) -> None:
        recorder = Recorder()
        recorder.runs.add(2, {"status": "completed"})
        recorder.runs.add(1, {"status": "failed"})
        recorder.loans.add(1250)
        assert recorder.view.snapshot()["pipeline"] == {
            "runs_total": 3,
            "completed": 2,
            "failed": 1,
            "interrupted": 0,
            "loans_processed": 1250,
        }

    def test_reset_starts_a_new_window_and_keeps_totals(self) -> None:
        recorder = Recorder()
        recorder.request("GET", "/x", 500, 0.005)
        recorder.view.reset_window()
        snap = recorder.view.snapshot()
        assert snap["requests"]["window"] == 0
        assert snap["latency_ms"]["samples"] == 0
        assert snap["status_codes"] == {}
        assert (snap["requests"]["total"], snap["requests"]["errors_total"]) == (1, 1)
        recorder.request("GET", "/y", 200, 0.005)
        assert recorder.view.snapshot()["top_routes"] == {"GET /y": 1}


class TestAdminEndpoints:
    ADMIN_PATHS = ("/admin/metrics", "/admin/health/detailed", "/admin/config", "/admin/info")

    async def test_admin_metrics_requires_auth(self, client: httpx.AsyncClient) -> None:
        for path in self.ADMIN_PATHS:
            response = await client.get(path)
            assert response.status_code == 401, path
            assert response.json()["error"]["code"] == "unauthorized"
        assert (await client.post("/admin/metrics/reset")).status_code == 401

    async def test_admin_metrics_requires_admin_role(
        self, client: httpx.AsyncClient, make_user: UserFactory
    ) -> None:
        analyst = await make_user("analyst")
        for path in self.ADMIN_PATHS:
            response = await client.get(path, headers=analyst["headers"])
            assert response.status_code == 403, path
            assert response.json()["error"]["code"] == "forbidden"

    async def test_admin_metrics_counts_real_requests(
        self, client: httpx.AsyncClient, admin_headers: dict[str, str]
    ) -> None:
        await client.post("/admin/metrics/reset", headers=admin_headers)
        for _ in range(3):
            assert (await client.get("/api/healthcare")).status_code == 200
        assert (await client.get("/api/test/boom")).status_code == 500
        assert (await client.get("/health/ready")).status_code == 200  # not counted
        body = (await client.get("/admin/metrics", headers=admin_headers)).json()
        assert body["top_routes"]["GET /api/healthcare"] == 3
        assert body["top_routes"]["GET /api/test/boom"] == 1
        assert not any(key.startswith("GET /health") for key in body["top_routes"])
        assert body["requests"]["window_errors"] == 1
        assert body["status_codes"]["500"] == 1
        assert body["latency_ms"]["p99"] > 0
        assert body["scope"]["covers"] == "this process"
        assert body["scope"]["pid"] == os.getpid()

    async def test_admin_health_detailed(
        self, app: FastAPI, client: httpx.AsyncClient, admin_headers: dict[str, str]
    ) -> None:
        app.state.settings = app.state.settings.model_copy(update={"HEALTH_INCLUDE_DETAILS": False})
        public = (await client.get("/health/ready")).json()
        assert "components" not in public
        detailed = (await client.get("/admin/health/detailed", headers=admin_headers)).json()
        assert set(detailed["components"]) == {"database", "storage", "system"}
        assert detailed["components"]["database"]["status"] in ("healthy", "degraded")
        assert detailed["version"] == app.state.settings.APP_VERSION

    async def test_admin_config_redacts_secrets(
        self, client: httpx.AsyncClient, admin_headers: dict[str, str]
    ) -> None:
        response = await client.get("/admin/config", headers=admin_headers)
        assert response.status_code == 200
        config = response.json()
        assert config["SECRET_KEY"] == "[REDACTED]"
        assert config["ADMIN_PASSWORD"] == "[REDACTED]"
        assert config["ENVIRONMENT"] == "test"
        assert config["DB_POOL_SIZE"] == 5
        assert TEST_SECRET not in response.text
        assert ADMIN_PASSWORD not in response.text

    async def test_admin_config_masks_database_password(
        self, clean_db: str, admin_headers: dict[str, str]
    ) -> None:
        url = clean_db.replace("postgres@", "postgres:db-pass-xyz@", 1)
        async with running(make_settings(DATABASE_URL=url)) as (_, c):
            token = await login(c, "admin", ADMIN_PASSWORD)
            response = await c.get("/admin/config", headers=bearer(token))
        assert "db-pass-xyz" not in response.text
        assert ":[REDACTED]@" in response.json()["DATABASE_URL"]

    async def test_admin_system_info(
        self, client: httpx.AsyncClient, admin_headers: dict[str, str]
    ) -> None:
        info = (await client.get("/admin/info", headers=admin_headers)).json()
        assert info["python_version"].startswith("3.11")
        assert info["database"]["dialect"] == "postgresql"
        assert info["database"]["pool"]["size"] == 5
        assert info["process"]["rss_mb"] > 0

    async def test_admin_endpoints_can_be_disabled(self, clean_db: str) -> None:
        async with running(make_settings(ADMIN_DIAGNOSTICS_ENABLED=False)) as (_, c):
            token = await login(c, "admin", ADMIN_PASSWORD)
            response = await c.get("/admin/metrics", headers=bearer(token))
        assert response.status_code == 404
