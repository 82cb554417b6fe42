"""The request context middleware: request ids, Server-Timing, the one access line.

(The hardening branch adds its classes to test_middleware.py; these live apart to keep
the merge clean. Same subject: what a client and an operator see per request.)
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.api.main import create_app
from backend.config import Settings
from backend.middleware.request_context import valid_request_id
from backend.tests.conftest import ADMIN_PASSWORD, TEST_SECRET, bearer, login
from backend.tests.hardening_support import http_scope as asgi_scope
from backend.tests.obs_helpers import Uvicorn, events, json_lines


class StubLimits:
    """Stands in for the hardening middleware (body limit, rate limit): it answers
    413 and 429 itself, from inside the request context, as those layers will."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = {"/api/stub/413": 413, "/api/stub/429": 429}.get(scope.get("path", ""))
        if scope["type"] != "http" or status is None:
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def build(settings: Settings) -> FastAPI:
    application = create_app(settings)
    # Innermost of the declared request path, where the hardening layers sit
    # (`add_middleware` would put it outside every layer).
    application.user_middleware.append(Middleware(StubLimits))

    @application.get("/api/test/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    application.state.hanging = asyncio.Event()

    @application.get("/api/test/hang")
    async def hang() -> None:
        application.state.hanging.set()
        await asyncio.Event().wait()  # until the client goes away

    @application.get("/api/test/ok")
    async def ok() -> dict[str, str]:
        structlog.get_logger("backend.tests").info("inside.route")
        return {"status": "ok"}

    return application


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = build(settings)
    async with application.router.lifespan_context(application):
        yield application


async def client_for(settings: Settings) -> tuple[FastAPI, httpx.AsyncClient]:
    application = build(settings)
    transport = httpx.ASGITransport(app=application, client=("192.0.2.1", 1234))
    return application, httpx.AsyncClient(transport=transport, base_url="http://testserver")


def http_scope(path: str, request_id: str) -> dict[str, Any]:
    """A plain ASGI HTTP scope, for calls an HTTP client would refuse to make."""
    return asgi_scope(
        path, headers=[(b"x-request-id", request_id.encode())], client=("192.0.2.1", 1)
    )


UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SERVER_TIMING = re.compile(r"^total;dur=\d+(\.\d+)?$")


class TestRequestContext:
    @pytest.mark.parametrize(
        "request_id",
        ["abc", "A-Z_0.9:x", "1-5759e988-bd862e3fe1be46a994272793", "x" * 128, "7"],
    )
    async def test_valid_incoming_request_id_is_kept(
        self, client: httpx.AsyncClient, request_id: str
    ) -> None:
        response = await client.get("/api/test/ok", headers={"X-Request-ID": request_id})
        assert response.headers["x-request-id"] == request_id

    @pytest.mark.parametrize(
        "request_id",
        [
            "x" * 129,
            "has space",
            "line\nbreak",
            "crlf\r\nX-Injected: 1",
            'quote"d',
            "semi;colon",
            "<script>",
            "caf\u00e9",
            "",
        ],
    )
    async def test_invalid_incoming_request_id_is_replaced(
        self, app: FastAPI, request_id: str
    ) -> None:
        # Straight through ASGI: an HTTP client would refuse to send some of these.
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await app(http_scope("/api/test/ok", request_id), receive, send)
        start = sent[0]
        assert start["status"] == 200
        (echoed,) = [v for k, v in start["headers"] if k == b"x-request-id"]
        assert UUID4.match(echoed.decode())
        assert not any(k == b"x-injected" for k, _ in start["headers"])

    def test_request_id_rule(self) -> None:
        assert valid_request_id("a" * 128)
        assert not valid_request_id("a" * 129)
        assert not valid_request_id("a\n")
        assert not valid_request_id(None)

    async def test_new_ids_are_unique_uuid4(self, client: httpx.AsyncClient) -> None:
        ids = {(await client.get("/health")).headers["x-request-id"] for _ in range(5)}
        assert len(ids) == 5
        assert all(UUID4.match(i) for i in ids)

    @pytest.mark.parametrize(
        ("path", "status"),
        [
            ("/api/test/ok", 200),
            ("/health", 200),
            ("/no/such/route", 404),
            ("/api/stub/413", 413),
            ("/api/stub/429", 429),
            ("/api/test/boom", 500),
        ],
    )
    async def test_every_response_has_request_id_and_server_timing(
        self, client: httpx.AsyncClient, path: str, status: int
    ) -> None:
        response = await client.get(path, headers={"X-Request-ID": f"every-{status}"})
        assert response.status_code == status
        assert response.headers["x-request-id"] == f"every-{status}"
        assert SERVER_TIMING.match(response.headers["server-timing"])
        if status >= 400 and status not in (413, 429):
            assert response.json()["error"]["request_id"] == f"every-{status}"

    async def test_exactly_one_access_line_with_level_by_status(
        self, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
    ) -> None:
        capsys.readouterr()
        expected = {
            "/api/test/ok": (200, "info"),
            "/no/such/route": (404, "warning"),
            "/api/stub/429": (429, "warning"),
            "/api/stub/413": (413, "warning"),
            "/api/test/boom": (500, "error"),
        }
        for n, path in enumerate(expected):
            await client.get(path, headers={"X-Request-ID": f"one-{n}"})
        lines = json_lines(capsys.readouterr().out)
        for n, (path, (status, level)) in enumerate(expected.items()):
            (line,) = events(lines, "http.request.completed", request_id=f"one-{n}")
            assert line["path"] == path
            assert line["status_code"] == status
            assert line["level"] == level
        (inside,) = events(lines, "inside.route")
        assert inside["request_id"] == "one-0"
        assert inside["route"] == "/api/test/ok"
        assert inside["method"] == "GET"
        assert inside["client_ip"] == "203.0.113.10"
        # Start lines and probes only at debug.
        assert not events(lines, "http.request.started")

    async def test_debug_level_logs_start_and_health_probes(
        self, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        application, client = await client_for(settings.model_copy(update={"LOG_LEVEL": "DEBUG"}))
        async with application.router.lifespan_context(application), client:
            capsys.readouterr()
            await client.get("/health", headers={"X-Request-ID": "probe-1"})
        lines = json_lines(capsys.readouterr().out)
        (started,) = events(lines, "http.request.started", request_id="probe-1")
        assert started["level"] == "debug"
        (done,) = events(lines, "http.request.completed", request_id="probe-1")
        assert done["level"] == "debug"

    async def test_health_probe_not_logged_at_info(
        self, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
    ) -> None:
        capsys.readouterr()
        await client.get("/health", headers={"X-Request-ID": "probe-2"})
        assert not [
            line
            for line in json_lines(capsys.readouterr().out)
            if line.get("request_id") == "probe-2"
        ]

    async def test_slow_request_warning(
        self, settings: Settings, capsys: pytest.CaptureFixture[str]
    ) -> None:
        application, client = await client_for(
            settings.model_copy(update={"SLOW_REQUEST_THRESHOLD_MS": 0})
        )
        async with application.router.lifespan_context(application), client:
            capsys.readouterr()
            await client.get("/api/test/ok", headers={"X-Request-ID": "slow-1"})
        (slow,) = events(json_lines(capsys.readouterr().out), "http.request.slow")
        assert slow["level"] == "warning"
        assert slow["request_id"] == "slow-1"
        assert slow["threshold_ms"] == 0
        assert slow["route"] == "/api/test/ok"
        assert slow["duration_ms"] > 0

    async def test_no_slow_warning_under_threshold(
        self, client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]
    ) -> None:
        capsys.readouterr()
        await client.get("/api/test/ok")
        assert not events(json_lines(capsys.readouterr().out), "http.request.slow")

    async def test_client_that_leaves_gets_one_access_line_with_499(
        self, app: FastAPI, capsys: pytest.CaptureFixture[str]
    ) -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()  # no body and no disconnect message: just hang
            return {}

        async def send(message: MutableMapping[str, Any]) -> None:
            raise AssertionError("nothing may be sent")

        capsys.readouterr()
        task = asyncio.ensure_future(app(http_scope("/api/test/hang", "gone-1"), receive, send))
        await asyncio.wait_for(app.state.hanging.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (line,) = events(json_lines(capsys.readouterr().out), "http.request.completed")
        assert line["request_id"] == "gone-1"
        assert line["status_code"] == 499
        assert line["route"] == "/api/test/hang"

    async def test_request_context_does_not_outlive_the_request(
        self, client: httpx.AsyncClient
    ) -> None:
        structlog.contextvars.clear_contextvars()
        await client.get("/api/test/ok", headers={"X-Request-ID": "gone-after"})
        assert structlog.contextvars.get_contextvars() == {}

    def test_real_server_500_is_logged_once_structured(self, clean_db: str) -> None:
        env = {
            "ENVIRONMENT": "test",
            "SECRET_KEY": TEST_SECRET,
            "DATABASE_URL": clean_db,
            "ADMIN_PASSWORD": ADMIN_PASSWORD,
        }
        with Uvicorn(env, app="backend.tests.boom_app:app") as server:
            response = httpx.get(
                f"{server.base_url}/api/test/boom", headers={"X-Request-ID": "real-500"}, timeout=10
            )
            assert response.status_code == 500
            assert response.headers["x-request-id"] == "real-500"
            assert response.json()["error"]["request_id"] == "real-500"
        assert "kaboom in a real server" not in response.text
        # One structured error line with the traceback, one access line; no plain
        # "Exception in ASGI application" traceback from uvicorn on top.
        assert server.output.count("kaboom in a real server") == 1
        assert "Exception in ASGI application" not in server.output
        lines = json_lines(server.output)
        (error,) = events(lines, "http.unhandled_exception")
        (access,) = events(lines, "http.request.completed", request_id="real-500")
        assert error["request_id"] == access["request_id"] == "real-500"
        assert error["trace_id"] == access["trace_id"]
        assert access["status_code"] == 500

    def test_pipelined_requests_on_one_connection_do_not_share_context(self, clean_db: str) -> None:
        env = {
            "ENVIRONMENT": "test",
            "SECRET_KEY": TEST_SECRET,
            "DATABASE_URL": clean_db,
            "ADMIN_PASSWORD": ADMIN_PASSWORD,
            "BCRYPT_ROUNDS": "4",
            "DB_POOL_SIZE": "2",
            "DB_MAX_OVERFLOW": "0",
        }
        with Uvicorn(env) as server:
            response = httpx.post(
                f"{server.base_url}/api/auth/login",
                data={"username": "admin", "password": ADMIN_PASSWORD},
                timeout=10,
            )
            token = response.json()["access_token"]

            def get(request_id: str, authorised: bool, last: bool = False) -> bytes:
                lines = [
                    "GET /api/auth/me HTTP/1.1",
                    "Host: 127.0.0.1",
                    f"X-Request-ID: {request_id}",
                ]
                if authorised:
                    lines.append(f"Authorization: Bearer {token}")
                if last:
                    lines.append("Connection: close")
                return ("\r\n".join(lines) + "\r\n\r\n").encode()

            burst = b"".join(
                [
                    get("pipe-1", True),
                    get("pipe-2", False),
                    get("pipe-3", True),
                    get("pipe-4", False, last=True),
                ]
            )
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(burst)  # all four before reading any answer
                received = b""
                while chunk := sock.recv(65536):
                    received += chunk
            assert received.count(b"HTTP/1.1 200") == 2
            assert received.count(b"HTTP/1.1 401") == 2
        # Every line the server wrote, uvicorn's included, is one JSON object, once.
        printed = [line for line in server.output.splitlines() if line.strip()]
        assert all(line.startswith("{") for line in printed), printed
        every = json_lines(server.output)
        assert len(events(every, "Application startup complete.")) == 1
        assert not [line for line in every if line["logger"] == "uvicorn.access"]
        lines = [line for line in every if "request_id" in line]
        for request_id, user in [
            ("pipe-1", "admin"),
            ("pipe-2", None),
            ("pipe-3", "admin"),
            ("pipe-4", None),
        ]:
            mine = [line for line in lines if line["request_id"] == request_id]
            assert len(events(mine, "http.request.completed")) == 1
            assert all(line.get("user") == user for line in mine), mine
        traces = {
            line["request_id"]: line["trace_id"]
            for line in events(lines, "http.request.completed")
            if line["request_id"].startswith("pipe-")
        }
        assert len(set(traces.values())) == 4


async def test_login_helper_still_works_with_context(client: httpx.AsyncClient) -> None:
    # The auth flow through the middleware: the token is issued and accepted.
    token = await login(client, "admin", ADMIN_PASSWORD)
    me = await client.get("/api/auth/me", headers=bearer(token))
    assert me.status_code == 200
    assert uuid.UUID(me.headers["x-request-id"]).version == 4
