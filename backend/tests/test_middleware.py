"""Middleware: security headers, trusted hosts, request limits, rate limiting, error envelope,
`Connection: close` while draining.

Everything is asserted over HTTP, on an app built with the settings under test,
against the real PostgreSQL and (for the shared limit) the real Redis.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from limits.aio.storage import MemoryStorage
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from backend.middleware.client_ip import TrustedProxies, client_ip
from backend.tests.conftest import ADMIN_PASSWORD, TEST_REDIS_URL, bearer, login
from backend.tests.hardening_support import (
    app_client,
    client_for,
    closed_port,
    http_scope,
    real_server,
    unique_prefix,
)

pytestmark = pytest.mark.usefixtures("clean_db")

ENVELOPE_KEYS = {"code", "message", "request_id", "trace_id", "details"}


def server_span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The one finished server span called `name` (the route template)."""
    (span,) = [s for s in exporter.get_finished_spans() if s.name == name]
    return span


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ENVELOPE_KEYS, body
    assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


def assert_no_internals(response: httpx.Response) -> None:
    text = response.text
    for marker in ("Traceback", 'File "', "/backend/", "SELECT", "sqlalchemy", "asyncpg"):
        assert marker not in text, f"{marker!r} leaked: {text}"


# ---------------------------------------------------------------- security headers


class TestSecurityHeaders:
    async def test_x_content_type_options(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).headers["x-content-type-options"] == "nosniff"

    async def test_x_frame_options(self, client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).headers["x-frame-options"] == "DENY"

    async def test_referrer_policy(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/auth/me")
        assert response.headers["referrer-policy"] == "strict-origin-when-cross-origin"

    async def test_permissions_policy(self, client: httpx.AsyncClient) -> None:
        policy = (await client.get("/health")).headers["permissions-policy"]
        assert "camera=()" in policy and "geolocation=()" in policy

    async def test_cache_control(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/api/auth/me")
        assert response.headers["cache-control"] == "no-store"

    async def test_headers_on_errors_too(self, client: httpx.AsyncClient) -> None:
        for response in (await client.get("/nope"), await client.get("/_test/crash")):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert "server" not in response.headers

    async def test_strict_csp_on_json_relaxed_only_on_docs(self, client: httpx.AsyncClient) -> None:
        api_csp = (await client.get("/health")).headers["content-security-policy"]
        assert api_csp.startswith("default-src 'none'")
        docs = await client.get("/docs")
        assert docs.status_code == 200
        assert "text/html" in docs.headers["content-type"]
        docs_csp = docs.headers["content-security-policy"]
        # The docs page loads Swagger UI from the CDN its HTML names; the CSP allows it.
        assert "https://cdn.jsdelivr.net" in docs.text
        assert "https://cdn.jsdelivr.net" in docs_csp
        assert "frame-ancestors 'none'" in docs_csp
        redoc = await client.get("/redoc")
        assert "https://cdn.jsdelivr.net" in redoc.headers["content-security-policy"]

    async def test_hsts_only_in_production_over_https_from_trusted_proxy(self) -> None:
        # The ASGI test client's peer is the ALB (10.0.0.5), trusted in this app.
        async with app_client(ip="10.0.0.5", ENVIRONMENT="test", TRUSTED_PROXIES="10.0.0.0/8") as (
            _,
            client,
        ):
            response = await client.get("/health", headers={"X-Forwarded-Proto": "https"})
            assert "strict-transport-security" not in response.headers  # not production

        from backend.api.main import create_app
        from backend.tests.conftest import make_settings

        settings = make_settings(TRUSTED_PROXIES="10.0.0.0/8")
        # A production app without its lifespan: /health needs no database.
        settings.ENVIRONMENT = "production"
        app = create_app(settings)
        async with client_for(app, "10.0.0.5") as alb:
            https = await alb.get("/health", headers={"X-Forwarded-Proto": "https"})
            plain = await alb.get("/health", headers={"X-Forwarded-Proto": "http"})
        assert https.headers["strict-transport-security"].startswith("max-age=")
        assert "strict-transport-security" not in plain.headers
        async with client_for(app, "198.51.100.7") as direct:
            forged = await direct.get("/health", headers={"X-Forwarded-Proto": "https"})
        assert "strict-transport-security" not in forged.headers

    async def test_switched_off(self) -> None:
        async with app_client(ENABLE_SECURITY_HEADERS=False) as (_, client):
            response = await client.get("/health")
        assert "x-frame-options" not in response.headers


class TestDraining:
    async def test_every_response_closes_its_connection_while_draining(
        self, app: FastAPI, client: httpx.AsyncClient, admin_headers: dict[str, str]
    ) -> None:
        before = await client.get("/api/auth/me", headers=admin_headers)
        assert before.status_code == 200 and "connection" not in before.headers

        app.state.draining = True
        responses = [
            await client.get("/api/auth/me", headers=admin_headers),
            await client.get("/health/live"),
            await client.get("/health/ready"),
            await client.get("/api/auth/me"),
            await client.get("/no/such/route"),
        ]
        assert [r.status_code for r in responses] == [200, 200, 503, 401, 404]
        for response in responses:
            assert response.headers.get_list("connection") == ["close"], response.headers
            # Still a complete response of its own.
            assert "x-request-id" in response.headers


class TestTrustedHosts:
    async def test_unknown_host_gets_envelope(self) -> None:
        async with app_client(TRUSTED_HOSTS="api.example.com,*.internal") as (_, client):
            ok = await client.get("/api/auth/me", headers={"Host": "api.example.com"})
            sub = await client.get("/api/auth/me", headers={"Host": "svc.internal:8000"})
            bad = await client.get("/api/auth/me", headers={"Host": "evil.example.net"})
        assert ok.status_code == 401  # past the host check: the route's own answer
        assert sub.status_code == 401
        assert_envelope(bad, 400, "bad_request")
        assert bad.headers["x-frame-options"] == "DENY"

    def test_probes_answer_any_host_on_a_real_server(self, clean_db: str) -> None:
        """The ALB checks targets with their IP as Host, ECS containers with localhost."""
        with real_server(None, TRUSTED_HOSTS="api.example.com") as (url, _):
            with httpx.Client(base_url=url, timeout=10) as http:
                for host in ("10.0.1.23:8000", "localhost"):
                    for path in ("/health", "/health/live", "/health/ready"):
                        response = http.get(path, headers={"Host": host})
                        assert response.status_code == 200, (host, path, response.text)
                    for path in ("/api/auth/me", "/api/health", "/docs", "/health/"):
                        refused = http.get(path, headers={"Host": host})
                        assert_envelope(refused, 400, "bad_request")
                assert (
                    http.get("/api/auth/me", headers={"Host": "api.example.com"}).status_code == 401
                )


class TestCors:
    async def test_origins_from_settings_even_on_429(self) -> None:
        async with app_client(
            CORS_ORIGINS="https://app.example.com",
            RATE_LIMIT_ENABLED=True,
            RATE_LIMIT_API="1/minute",
        ) as (_, client):
            good = {"Origin": "https://app.example.com"}
            first = await client.get("/api/auth/me", headers=good)
            limited = await client.get("/api/auth/me", headers=good)
            other = await client.get("/health", headers={"Origin": "https://evil.example"})
        assert first.headers["access-control-allow-origin"] == "https://app.example.com"
        # The browser may read the 429 (and its Retry-After), not just see a CORS error.
        assert limited.status_code == 429
        assert limited.headers["access-control-allow-origin"] == "https://app.example.com"
        exposed = limited.headers["access-control-expose-headers"].lower()
        assert "retry-after" in exposed and "x-ratelimit-remaining" in exposed
        assert "access-control-allow-origin" not in other.headers

    async def test_refused_preflight_is_an_envelope_with_security_headers(self) -> None:
        async with app_client(CORS_ORIGINS="https://app.example.com") as (_, client):

            async def preflight(origin: str, method: str, headers: str) -> httpx.Response:
                return await client.options(
                    "/api/auth/login",
                    headers={
                        "Origin": origin,
                        "Access-Control-Request-Method": method,
                        "Access-Control-Request-Headers": headers,
                    },
                )

            allowed = await preflight("https://app.example.com", "POST", "Content-Type")
            bad_origin = await preflight("https://evil.example", "POST", "Content-Type")
            bad_method = await preflight("https://app.example.com", "PUT", "Content-Type")
            bad_header = await preflight("https://app.example.com", "POST", "X-Evil")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        assert allowed.headers["x-content-type-options"] == "nosniff"
        for response, refused in (
            (bad_origin, ["origin"]),
            (bad_method, ["method"]),
            (bad_header, ["headers"]),
        ):
            error = assert_envelope(response, 400, "cors_refused")
            assert error["details"] == {"refused": refused}
            assert error["request_id"] == response.headers["x-request-id"]
            assert "Disallowed CORS" not in response.text
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert (
                response.headers["content-security-policy"]
                == "default-src 'none'; frame-ancestors 'none'"
            )
            assert "access-control-allow-origin" not in response.headers


# ---------------------------------------------------------------- request limits


class TestRequestLimits:
    async def test_huge_content_length_rejected_up_front(self, client: httpx.AsyncClient) -> None:
        # The declared size alone decides: the body is never read.
        response = await client.post(
            "/api/auth/register",
            content=b"{}",
            headers={"Content-Length": str(10 * 1024**3), "Content-Type": "application/json"},
        )
        error = assert_envelope(response, 413, "payload_too_large")
        assert error["details"] == {"limit_bytes": 100 * 1024 * 1024}

    async def test_chunked_oversize_body_rejected_while_streaming(self) -> None:
        sent = 0

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal sent
            for _ in range(64):  # up to 4 MB; the limit is 1 MB
                sent += 64 * 1024
                yield b"x" * (64 * 1024)

        async with app_client(MAX_REQUEST_SIZE_MB=1) as (_, client):
            response = await client.post(
                "/api/auth/register",
                content=chunks(),
                headers={"Content-Type": "application/json"},
            )
        assert "content-length" not in response.request.headers
        assert_envelope(response, 413, "payload_too_large")
        # Refused as soon as the limit was passed, not after the whole body arrived.
        assert sent <= 1024 * 1024 + 2 * 64 * 1024
        assert_no_internals(response)

    def test_chunked_oversize_body_logs_one_error_on_a_real_server(self) -> None:
        """The 413 is the only error line for the request: no 400 from the app after it."""

        def chunks() -> Iterator[bytes]:
            for _ in range(48):  # 3 MB against a 1 MB limit, no Content-Length
                yield b"x" * 65536

        request_id = f"chunked-{uuid.uuid4().hex}"
        with real_server(None, MAX_REQUEST_SIZE_MB="1") as (url, process):
            with httpx.Client(base_url=url, timeout=10) as http:
                response = http.post(
                    "/api/auth/register",
                    content=chunks(),
                    headers={"Content-Type": "application/json", "X-Request-ID": request_id},
                )
            # A graceful stop finishes the request's logging before the process exits.
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
            output = process.stdout.read().decode() if process.stdout else ""
        assert_envelope(response, 413, "payload_too_large")
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == request_id]
        errors = [line for line in mine if line["event"] == "http.error"]
        assert [(e["status_code"], e["code"]) for e in errors] == [(413, "payload_too_large")], mine
        # The access line is the only warning (a 4xx); nothing at error level.
        loud = [line for line in mine if line["level"] in ("warning", "error", "critical")]
        assert [(line["event"], line["status_code"]) for line in loud] == [
            ("http.request.completed", 413)
        ], mine

    async def test_body_under_limit_passes(self) -> None:
        async with app_client(MAX_REQUEST_SIZE_MB=1) as (_, client):
            response = await client.post("/api/auth/register", json={"username": "x"})
        assert_envelope(response, 422, "validation_error")

    async def test_upload_path_uses_upload_limit(self) -> None:
        big = str(5 * 1024 * 1024)
        async with app_client(MAX_REQUEST_SIZE_MB=1, MAX_UPLOAD_SIZE_MB=10) as (_, client):
            upload = await client.post(
                "/api/files/upload", content=b"", headers={"Content-Length": big}
            )
            other = await client.post(
                "/api/auth/register", content=b"", headers={"Content-Length": big}
            )
        # 5 MB passes the upload limit (the route itself does not exist in this build).
        assert upload.status_code != 413
        assert_envelope(other, 413, "payload_too_large")

    async def test_invalid_content_length_is_400(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/api/auth/register", content=b"{}", headers={"Content-Length": "12abc"}
        )
        assert_envelope(response, 400, "bad_request")

    @pytest.mark.parametrize(
        "url", ["/api/auth/me%00.json", "/health%00", "/api/users?x=%00", "/health?q=a%0Db"]
    )
    async def test_null_byte_and_control_chars_rejected(
        self, client: httpx.AsyncClient, url: str
    ) -> None:
        response = await client.get(url)
        assert_envelope(response, 400, "bad_request")

    async def test_request_timeout_is_504(self) -> None:
        exporter = InMemorySpanExporter()
        async with app_client(exporter=exporter, REQUEST_TIMEOUT_SECONDS=1) as (_, client):
            with structlog.testing.capture_logs() as logs:
                response = await client.get("/_test/slow", params={"seconds": 5})
        error = assert_envelope(response, 504, "gateway_timeout")
        assert "took too long" in error["message"]
        assert any(line["event"] == "http.request.timeout" for line in logs)
        span = server_span(exporter, "GET /_test/slow")
        assert span.status.status_code is StatusCode.ERROR


# ---------------------------------------------------------------- rate limiting


class TestRateLimiting:
    async def test_under_limit_allowed(self) -> None:
        async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_API="5/minute") as (_, c):
            statuses = [(await c.get("/api/auth/me")).status_code for _ in range(5)]
        assert statuses == [401] * 5

    async def test_over_limit_returns_429(self) -> None:
        async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_LOGIN="10/minute") as (_, c):
            form = {"username": "admin", "password": "wrong-password-0000"}
            statuses = [(await c.post("/api/auth/login", data=form)).status_code for _ in range(10)]
            limited = await c.post("/api/auth/login", data=form)
        assert statuses == [401] * 10
        error = assert_envelope(limited, 429, "rate_limited")
        assert error["details"]["rule"] == "login"

    async def test_rate_limit_headers_present(self) -> None:
        async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_API="5/minute") as (_, c):
            first = await c.get("/api/auth/me")
            second = await c.get("/api/auth/me")
        assert first.headers["x-ratelimit-limit"] == "5"
        assert first.headers["x-ratelimit-remaining"] == "4"
        assert second.headers["x-ratelimit-remaining"] == "3"
        assert int(first.headers["x-ratelimit-reset"]) > 1_600_000_000  # epoch seconds
        assert first.headers["ratelimit-policy"] == '"api";q=5;w=60'
        assert first.headers["ratelimit"].startswith('"api";r=4;t=')

    async def test_retry_after_header_on_429(self) -> None:
        async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_API="2/minute") as (_, c):
            for _ in range(2):
                await c.get("/api/auth/me")
            limited = await c.get("/api/auth/me")
        assert_envelope(limited, 429, "rate_limited")
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["x-ratelimit-remaining"] == "0"

    async def test_different_ips_have_separate_limits(self) -> None:
        async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_API="2/minute") as (app, a):
            async with client_for(app, "198.51.100.20") as b:
                assert [(await a.get("/api/auth/me")).status_code for _ in range(3)] == [
                    401,
                    401,
                    429,
                ]
                assert (await b.get("/api/auth/me")).status_code == 401

    async def test_health_endpoints_not_rate_limited(self) -> None:
        async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_API="1/minute") as (_, c):
            for _ in range(5):
                for path in ("/health", "/health/live", "/health/ready", "/openapi.json"):
                    response = await c.get(path)
                    assert response.status_code == 200, (path, response.text)
                    assert "x-ratelimit-limit" not in response.headers

    async def test_forged_x_forwarded_for_does_not_dodge_the_limit(self) -> None:
        # The client (not a trusted proxy) rotates X-Forwarded-For on every request.
        async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_LOGIN="3/minute") as (_, c):
            form = {"username": "admin", "password": "wrong-password-0000"}
            statuses = [
                (
                    await c.post(
                        "/api/auth/login", data=form, headers={"X-Forwarded-For": f"10.9.9.{n}"}
                    )
                ).status_code
                for n in range(5)
            ]
        assert statuses == [401, 401, 401, 429, 429]

    async def test_x_forwarded_for_believed_from_trusted_proxy(self) -> None:
        async with app_client(
            ip="10.0.0.5",
            TRUSTED_PROXIES="10.0.0.0/8",
            RATE_LIMIT_ENABLED=True,
            RATE_LIMIT_LOGIN="2/minute",
        ) as (_, alb):
            form = {"username": "admin", "password": "wrong-password-0000"}

            async def attempt(xff: str) -> int:
                response = await alb.post(
                    "/api/auth/login", data=form, headers={"X-Forwarded-For": xff}
                )
                return response.status_code

            # Two clients behind the ALB have separate buckets...
            assert [await attempt("198.51.100.1") for _ in range(3)] == [401, 401, 429]
            assert await attempt("198.51.100.2") == 401
            # ...and a forged left part does not change which bucket is used.
            assert await attempt("1.2.3.4, 198.51.100.1") == 429

    async def test_per_user_limit_uses_verified_token_only(self) -> None:
        async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_API="3/minute") as (app, c):
            token = await login(c, "admin", ADMIN_PASSWORD)
            async with client_for(app, "198.51.100.30") as other_ip:
                # The same user from two addresses shares one bucket.
                statuses = [
                    (await c.get("/api/auth/me", headers=bearer(token))).status_code,
                    (await other_ip.get("/api/auth/me", headers=bearer(token))).status_code,
                    (await c.get("/api/auth/me", headers=bearer(token))).status_code,
                    (await other_ip.get("/api/auth/me", headers=bearer(token))).status_code,
                ]
                # A token with a bad signature falls back to the address, not the user.
                forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
                fallback = await other_ip.get("/api/auth/me", headers=bearer(forged))
        assert statuses == [200, 200, 200, 429]
        assert fallback.status_code == 401

    async def test_two_instances_share_a_redis_limit(self) -> None:
        prefix = unique_prefix()
        env = {
            "RATE_LIMIT_ENABLED": "true",
            "RATE_LIMIT_API": "4/minute",
            "RATE_LIMIT_STORAGE_URL": TEST_REDIS_URL,
            "RATE_LIMIT_KEY_PREFIX": prefix,
        }
        with real_server(None, **env) as (url_a, _), real_server(None, **env) as (url_b, _):
            async with httpx.AsyncClient() as http:
                statuses = []
                for n in range(6):
                    base = url_a if n % 2 == 0 else url_b
                    statuses.append((await http.get(f"{base}/api/auth/me")).status_code)
        # Each instance alone saw only 3 requests: the 5th overall is refused anyway.
        assert statuses == [401, 401, 401, 401, 429, 429]

    async def test_redis_down_fails_open_with_one_warning(self) -> None:
        down = f"redis://127.0.0.1:{closed_port()}/0"
        async with app_client(
            RATE_LIMIT_ENABLED=True, RATE_LIMIT_API="2/minute", RATE_LIMIT_STORAGE_URL=down
        ) as (app, c):
            with structlog.testing.capture_logs() as logs:
                statuses = [(await c.get("/api/auth/me")).status_code for _ in range(6)]
        assert statuses == [401] * 6  # served, unlimited
        # Five failures open the breaker: one warning; the sixth is not even tried.
        warnings = [line for line in logs if line["event"] == "circuit.opened"]
        assert [w["dependency"] for w in warnings] == ["rate_limit_storage"]
        assert app.state.rate_limiter.storage_errors == 6
        assert app.state.rate_limiter.breaker.refused_total == 1

    async def test_redis_outage_and_recovery(self) -> None:
        """Through a TCP relay to the real Redis that the test cuts and restores; the
        breaker opens on the first failure and lets a probe through after 1 ms."""
        redis_url = httpx.URL(TEST_REDIS_URL)
        relay = RedisRelay(redis_url.host, redis_url.port or 6379)
        port = await relay.start()
        url = f"redis://127.0.0.1:{port}{redis_url.path}"
        try:
            async with app_client(
                RATE_LIMIT_ENABLED=True,
                RATE_LIMIT_API="50/minute",
                RATE_LIMIT_STORAGE_URL=url,
                RATE_LIMIT_KEY_PREFIX=unique_prefix(),
                CIRCUIT_FAILURE_THRESHOLD=1,
                CIRCUIT_RECOVERY_SECONDS=0.001,
            ) as (_, c):
                with structlog.testing.capture_logs() as logs:
                    before = await c.get("/api/auth/me")
                    await relay.stop()
                    during = [await c.get("/api/auth/me") for _ in range(3)]
                    await relay.start(port)
                    after = await c.get("/api/auth/me")
        finally:
            await relay.stop()
        assert before.headers["x-ratelimit-remaining"] == "49"
        assert [r.status_code for r in during] == [401, 401, 401]
        assert all("x-ratelimit-limit" not in r.headers for r in during)
        # Counting resumes where it stopped: the outage requests were not counted.
        assert after.headers["x-ratelimit-remaining"] == "48"
        events = [line["event"] for line in logs if line["event"].startswith("circuit.")]
        assert events[0] == "circuit.opened" and events.count("circuit.opened") == 1, events
        assert events[-1] == "circuit.closed" and events.count("circuit.closed") == 1, events

    async def test_redis_down_fail_closed_is_503(self) -> None:
        down = f"redis://127.0.0.1:{closed_port()}/0"
        async with app_client(
            RATE_LIMIT_ENABLED=True, RATE_LIMIT_STORAGE_URL=down, RATE_LIMIT_FAIL_OPEN=False
        ) as (_, c):
            response = await c.get("/api/auth/me")
            health = await c.get("/health")
        assert_envelope(response, 503, "service_unavailable")
        assert health.status_code == 200

    async def test_memory_backend_is_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from backend.middleware import rate_limiter

        monkeypatch.setattr(rate_limiter, "MEMORY_MAX_KEYS", 4)
        async with app_client(RATE_LIMIT_ENABLED=True) as (app, _):
            with structlog.testing.capture_logs() as logs:
                for n in range(12):
                    async with client_for(app, f"198.51.100.{n + 1}") as c:
                        assert (await c.get("/api/auth/me")).status_code == 401
                    # The store's real tables: counters, their deadlines, their locks.
                    store = app.state.rate_limiter.storage
                    assert isinstance(store, MemoryStorage)
                    sizes = [len(store.storage), len(store.expirations), len(store.locks)]
                    assert max(sizes) <= 4 + 1, sizes
        assert any(line["event"] == "ratelimit.memory.reset" for line in logs)

    async def test_pipeline_rule_is_per_user(self) -> None:
        async with app_client(
            RATE_LIMIT_ENABLED=True, RATE_LIMIT_PIPELINE="2/minute", RATE_LIMIT_API="50/minute"
        ) as (app, c):
            headers = bearer(await login(c, "admin", ADMIN_PASSWORD))
            runs = [(await c.post("/api/pipeline/run", headers=headers)) for _ in range(3)]
            # Another user's bucket, and other endpoints, are untouched.
            async with client_for(app, "198.51.100.40") as other:
                anonymous = await other.post("/api/pipeline/run")
            me = await c.get("/api/auth/me", headers=headers)
        # Whatever the route answers (it lands with the pipeline), it is not limited yet.
        assert all(r.status_code != 429 for r in runs[:2])
        assert runs[0].headers["ratelimit-policy"] == '"pipeline";q=2;w=60'
        assert_envelope(runs[2], 429, "rate_limited")
        assert anonymous.status_code != 429
        assert me.status_code == 200 and me.headers["x-ratelimit-limit"] == "50"

    async def test_redis_limit_in_process(self) -> None:
        async with app_client(
            RATE_LIMIT_ENABLED=True,
            RATE_LIMIT_REGISTER="2/minute",
            RATE_LIMIT_STORAGE_URL=TEST_REDIS_URL,
            RATE_LIMIT_KEY_PREFIX=unique_prefix(),
        ) as (_, c):
            statuses = [(await c.post("/api/auth/register", json={})).status_code for _ in range(3)]
        assert statuses == [422, 422, 429]


class RedisRelay:
    """A TCP relay in front of the real Redis, to cut and restore the link."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        bound: int = self.server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


def test_client_ip_reads_forwarded_for_from_the_right() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "::1/128"])

    def scope(peer: str, xff: str | None) -> dict[str, Any]:
        headers = [(b"x-forwarded-for", xff.encode())] if xff else []
        return {"type": "http", "client": (peer, 1234), "headers": headers}

    assert client_ip(scope("198.51.100.9", "1.1.1.1"), trusted) == "198.51.100.9"
    assert client_ip(scope("10.0.0.5", "1.1.1.1, 203.0.113.4, 10.0.0.9"), trusted) == (
        "203.0.113.4"
    )
    assert client_ip(scope("10.0.0.5", None), trusted) == "10.0.0.5"
    assert client_ip(scope("10.0.0.5", "not-an-ip, 10.1.1.1"), trusted) == "10.1.1.1"
    assert client_ip(scope("::1", "[2001:db8::1]:443"), trusted) == "2001:db8::1"


# ---------------------------------------------------------------- error envelope


class TestErrorHandler:
    async def test_404_returns_structured_error(self, client: httpx.AsyncClient) -> None:
        assert_envelope(await client.get("/api/does-not-exist"), 404, "not_found")

    async def test_405_method_not_allowed(self, client: httpx.AsyncClient) -> None:
        response = await client.delete("/api/auth/login")
        assert_envelope(response, 405, "method_not_allowed")
        assert "POST" in response.headers["allow"]

    async def test_422_returns_safe_validation_error(self, client: httpx.AsyncClient) -> None:
        secret_value = "my-very-secret-password-value"
        response = await client.post(
            "/api/auth/register",
            json={"username": "!", "email": "not-an-email", "password": secret_value},
        )
        error = assert_envelope(response, 422, "validation_error")
        assert secret_value not in response.text and "not-an-email" not in response.text
        assert all(set(d) == {"location", "message", "type"} for d in error["details"])

    async def test_500_does_not_expose_stack_trace(self) -> None:
        exporter = InMemorySpanExporter()
        async with app_client(exporter=exporter) as (_, client):
            with structlog.testing.capture_logs() as logs:
                response = await client.get("/_test/crash")
        span = server_span(exporter, "GET /_test/crash")
        assert span.status.status_code is StatusCode.ERROR
        assert [event.name for event in span.events] == ["exception"]
        error = assert_envelope(response, 500, "internal_error")
        assert error["message"] == "Internal server error"
        assert "secret-internal-detail" not in response.text
        assert_no_internals(response)
        # The server keeps the whole story, at error level with the traceback.
        (line,) = [entry for entry in logs if entry["event"] == "http.unhandled_exception"]
        assert line["log_level"] == "error"
        assert isinstance(line["exc_info"], RuntimeError)

    async def test_4xx_logged_at_info_without_traceback(self, client: httpx.AsyncClient) -> None:
        with structlog.testing.capture_logs() as logs:
            await client.get("/api/auth/me")
        (line,) = [entry for entry in logs if entry["event"] == "http.error"]
        assert line["log_level"] == "info" and line["status_code"] == 401
        assert "exc_info" not in line

    async def test_error_response_includes_request_id(self, client: httpx.AsyncClient) -> None:
        # The id comes from the request context (bound by the request-context layer);
        # the key is always present, so clients can rely on the shape.
        structlog.contextvars.bind_contextvars(request_id="req-test-123")
        try:
            response = await client.get(
                "/api/does-not-exist", headers={"X-Request-ID": "req-test-123"}
            )
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
        assert assert_envelope(response, 404, "not_found")["request_id"] == "req-test-123"

    async def test_x_request_id_with_newline_is_harmless(self, app: FastAPI) -> None:
        # httpx refuses to send a raw newline; a raw ASGI header carries it anyway.
        messages: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        bad = b"abc\r\nSet-Cookie: evil=1"
        scope = {**http_scope("/api/auth/me", headers=[(b"x-request-id", bad)]), "app": app}
        await app(scope, receive, send)  # type: ignore[arg-type]
        start = messages[0]
        assert start["status"] == 401
        for _, value in start["headers"]:
            assert b"\n" not in value and b"evil" not in value
        body = b"".join(m.get("body", b"") for m in messages[1:])
        assert b"evil" not in body
        assert json.loads(body)["error"]["code"] == "unauthorized"

    async def test_ten_kb_header_values(self, client: httpx.AsyncClient) -> None:
        huge = "a" * 10 * 1024
        me = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {huge}"})
        assert_envelope(me, 401, "unauthorized")
        health = await client.get("/health", headers={"User-Agent": huge, "X-Request-ID": huge})
        assert health.status_code == 200


async def test_concurrent_rate_limited_requests_count_exactly() -> None:
    async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_API="10/minute") as (_, c):
        responses = await asyncio.gather(*(c.get("/api/auth/me") for _ in range(15)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [401] * 10 + [429] * 5


# ---------------------------------------------------------------- request id and timing
#
# test_request_context.py covers the id rule (which incoming ids are kept or replaced),
# the access line and stand-in 413/429 layers. The spec's classes below check the two
# headers over HTTP through the real create_app(), on answers made by every layer that
# can answer: the router (200, 404), the body limit (413), the rate limiter (429) and
# the error handler (500).

UUID4_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
SERVER_TIMING_TOTAL = re.compile(r"^total;dur=(?P<ms>\d+(?:\.\d+)?)$")

# kind -> (method, path, expected status)
ANSWERS: dict[str, tuple[str, str, int]] = {
    "ok": ("GET", "/health", 200),
    "not_found": ("GET", "/api/does-not-exist", 404),
    "too_large": ("POST", "/api/auth/register", 413),
    "rate_limited": ("POST", "/api/auth/login", 429),
    "crash": ("GET", "/_test/crash", 500),
}
Hit = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
async def hit() -> AsyncIterator[Hit]:
    """`await hit(kind, request_id=None)`: one request that gets the `kind` answer.

    The login rule allows one attempt per minute and that attempt is spent here,
    so every "rate_limited" request is refused by the real rate limiter.
    """
    async with app_client(RATE_LIMIT_ENABLED=True, RATE_LIMIT_LOGIN="1/minute") as (_, client):
        form = {"username": "admin", "password": "wrong-password-0000"}
        assert (await client.post("/api/auth/login", data=form)).status_code == 401

        async def request(kind: str, request_id: str | None = None) -> httpx.Response:
            method, path, status = ANSWERS[kind]
            headers = {"X-Request-ID": request_id} if request_id is not None else {}
            if kind == "too_large":
                # Refused on the declared size alone; the body is never read.
                headers["Content-Length"] = str(10 * 1024**3)
                headers["Content-Type"] = "application/json"
                response = await client.request(method, path, content=b"{}", headers=headers)
            elif kind == "rate_limited":
                response = await client.request(method, path, data=form, headers=headers)
            else:
                response = await client.request(method, path, headers=headers)
            assert response.status_code == status, (kind, response.text)
            return response

        yield request


def envelope_request_id(response: httpx.Response) -> str | None:
    """The request id inside the error envelope (None on a success)."""
    if response.status_code < 400:
        return None
    request_id: str = response.json()["error"]["request_id"]
    return request_id


class TestRequestIDMiddleware:
    @pytest.mark.parametrize("kind", ANSWERS)
    async def test_response_has_request_id_header(self, hit: Hit, kind: str) -> None:
        response = await hit(kind)
        request_id = response.headers["x-request-id"]
        assert request_id
        if response.status_code >= 400:
            # The envelope names the same request the header does.
            assert envelope_request_id(response) == request_id

    @pytest.mark.parametrize("kind", ANSWERS)
    async def test_custom_request_id_preserved(self, hit: Hit, kind: str) -> None:
        # An ALB / upstream id (X-Ray style) passes through unchanged.
        custom = f"1-67a1b2c3-{kind}-0123456789abcdef"
        response = await hit(kind, custom)
        assert response.headers["x-request-id"] == custom
        assert envelope_request_id(response) in (None, custom)

    @pytest.mark.parametrize("kind", ANSWERS)
    async def test_request_id_is_valid_uuid(self, hit: Hit, kind: str) -> None:
        generated = (await hit(kind)).headers["x-request-id"]
        assert UUID4_TEXT.match(generated), generated
        parsed = uuid.UUID(generated)
        assert parsed.version == 4 and str(parsed) == generated

    async def test_each_request_gets_unique_id(self, hit: Hit) -> None:
        # Concurrent requests on every path: no id is reused or leaks into another answer.
        kinds = list(ANSWERS) * 6
        responses = await asyncio.gather(*(hit(kind) for kind in kinds))
        ids = [r.headers["x-request-id"] for r in responses]
        assert len(set(ids)) == len(kinds)
        for response, request_id in zip(responses, ids, strict=True):
            assert envelope_request_id(response) in (None, request_id)


class TestTimingMiddleware:
    @pytest.mark.parametrize("kind", ANSWERS)
    async def test_server_timing_header_present(self, hit: Hit, kind: str) -> None:
        response = await hit(kind)
        assert SERVER_TIMING_TOTAL.match(response.headers["server-timing"]), response.headers

    @pytest.mark.parametrize("kind", ANSWERS)
    async def test_timing_is_positive_number(self, hit: Hit, kind: str) -> None:
        started = time.perf_counter()
        response = await hit(kind)
        elapsed_ms = (time.perf_counter() - started) * 1000
        match = SERVER_TIMING_TOTAL.match(response.headers["server-timing"])
        assert match is not None
        # Positive, and no more than the client itself waited: a real measurement.
        assert 0 < float(match["ms"]) <= elapsed_ms

    async def test_timing_covers_the_whole_request(self) -> None:
        async with app_client() as (_, client):
            response = await client.get("/_test/slow", params={"seconds": 0.2})
        match = SERVER_TIMING_TOTAL.match(response.headers["server-timing"])
        assert match is not None
        assert float(match["ms"]) >= 200
