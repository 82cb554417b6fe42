"""The declared request path: the route looked up once and what reads it.

One lookup per request (RequestStartMiddleware) feeds the server span's name and
http.route, the log context and the access line, and the rate-limit rule. These
tests check what a client, an operator and a trace viewer see from that value.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog
from fastapi import FastAPI
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from backend.api.main import create_app
from backend.config import Settings
from backend.middleware.request_start import RouteTable
from backend.tests.obs_helpers import events, json_lines


def scope(app: FastAPI, method: str, path: str) -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "root_path": "", "app": app}


def test_the_route_table_finds_templates_of_included_routers(settings: Settings) -> None:
    app = create_app(settings)
    table = RouteTable()
    run_id = str(uuid.uuid4())
    assert table.template(scope(app, "GET", f"/api/pipeline/runs/{run_id}")) == (
        "/api/pipeline/runs/{run_id}"
    )
    assert table.template(scope(app, "GET", "/api/auth/me")) == "/api/auth/me"
    assert table.template(scope(app, "GET", "/health/ready")) == "/health/ready"
    # Wrong method: the route still names the request (the router answers 405).
    assert table.template(scope(app, "DELETE", "/api/auth/me")) == "/api/auth/me"
    assert table.template(scope(app, "GET", "/api/no/such/thing")) is None


def test_a_route_added_after_the_first_lookup_is_found(settings: Settings) -> None:
    app = create_app(settings)
    table = RouteTable()
    assert table.template(scope(app, "GET", "/api/late/7")) is None

    @app.get("/api/late/{n}")
    async def late(n: int) -> dict[str, int]:
        return {"n": n}

    assert table.template(scope(app, "GET", "/api/late/7")) == "/api/late/{n}"


@pytest.fixture
async def traced(settings: Settings) -> AsyncIterator[tuple[FastAPI, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    application = create_app(settings, span_exporter=exporter)

    @application.get("/api/items/{item_id}")
    async def item(item_id: int) -> dict[str, object]:
        structlog.get_logger("backend.tests").info("item.read", item_id=item_id)
        return {"item_id": item_id}

    async with application.router.lifespan_context(application):
        yield application, exporter


async def test_span_log_context_and_access_line_share_the_template(
    traced: tuple[FastAPI, InMemorySpanExporter], capsys: pytest.CaptureFixture[str]
) -> None:
    app, exporter = traced
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        capsys.readouterr()
        response = await client.get("/api/items/42", headers={"X-Request-ID": "route-once-1"})
        missing = await client.get("/api/nowhere", headers={"X-Request-ID": "route-once-2"})
    assert response.status_code == 200 and missing.status_code == 404
    app.state.tracing.processor.force_flush()

    servers = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    by_name = {s.name: s for s in servers}
    assert set(by_name) == {"GET /api/items/{item_id}", "GET"}
    found = by_name["GET /api/items/{item_id}"]
    assert found.attributes is not None
    assert found.attributes["http.route"] == "/api/items/{item_id}"
    assert found.attributes["request.id"] == "route-once-1"
    unmatched = by_name["GET"]
    assert unmatched.attributes is not None and "http.route" not in unmatched.attributes

    lines = json_lines(capsys.readouterr().out)
    (inside,) = events(lines, "item.read")
    assert inside["route"] == "/api/items/{item_id}"
    assert inside["request_id"] == "route-once-1"
    (access,) = events(lines, "http.request.completed", request_id="route-once-1")
    assert access["route"] == "/api/items/{item_id}" and access["path"] == "/api/items/42"
    (unrouted,) = events(lines, "http.request.completed", request_id="route-once-2")
    assert "route" not in unrouted and unrouted["status_code"] == 404


def test_the_built_stack_is_the_declared_list_in_order(settings: Settings) -> None:
    """What runs is what api/main.py declares, outermost first: FastAPI's own error
    layers outside it, its exception handlers and the router inside, nothing patched in."""
    app = create_app(settings.model_copy(update={"RATE_LIMIT_ENABLED": True}))
    declared = [getattr(m.cls, "__name__", "") for m in app.user_middleware]
    assert declared == [
        "RequestStartMiddleware",
        "OpenTelemetryMiddleware",
        "RequestContextMiddleware",
        "ErrorHandlerMiddleware",
        "TrustedHostMiddleware",
        "CompressionMiddleware",
        "RequestLimitsMiddleware",
        "RateLimitMiddleware",
    ]
    built: list[str] = []
    node: object = app.build_middleware_stack()
    while node is not None and not isinstance(node, FastAPI):
        built.append(type(node).__name__)
        node = getattr(node, "app", None)
    start = built.index(declared[0])
    assert built[start : start + len(declared)] == declared
    assert built[start + len(declared)] == "ExceptionMiddleware"
    assert "ServerErrorMiddleware" in built[:start]
