"""Production hardening: database pool behaviour, readiness, graceful shutdown,
request validation and start-up checks, each over HTTP or at process level."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from backend.config import Settings, config_summary
from backend.tests.conftest import (
    ADMIN_PASSWORD,
    TEST_DATABASE_URL,
    bearer,
    login,
    make_settings,
)
from backend.tests.hardening_support import (
    ROOT,
    VENV_BIN,
    app_client,
    client_for,
    closed_port,
    free_port,
    real_server,
    running_app,
    server_env,
)
from backend.tests.test_middleware import assert_envelope, assert_no_internals

pytestmark = pytest.mark.usefixtures("clean_db")


def down_url() -> str:
    """A PostgreSQL URL where nothing listens: connections are refused at once."""
    return f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/nowhere"


@pytest.fixture
def blackhole_port() -> Iterator[int]:
    """A TCP listener that accepts connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


# ---------------------------------------------------------------- database pool


class TestDatabasePooling:
    async def test_pool_settings_applied(self) -> None:
        async with app_client(
            DB_POOL_SIZE=3, DB_MAX_OVERFLOW=4, DB_POOL_TIMEOUT=7, DB_POOL_RECYCLE=123
        ) as (app, _):
            pool: Any = app.state.db.engine.pool
            assert pool.size() == 3
            assert pool._max_overflow == 4
            assert pool._timeout == 7
            assert pool._recycle == 123
            assert pool._pre_ping is True

    async def test_connection_recycling(self) -> None:
        """Connections killed server-side are replaced on checkout (pool_pre_ping)."""
        async with app_client() as (_, client):
            headers = bearer(await login(client, "admin", ADMIN_PASSWORD))
            assert (await client.get("/api/auth/me", headers=headers)).status_code == 200
            killer = create_async_engine(TEST_DATABASE_URL, poolclass=NullPool)
            try:
                async with killer.begin() as conn:
                    killed = (
                        await conn.execute(
                            text(
                                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = current_database() "
                                "AND application_name = 'loan-engine' "
                                "AND pid <> pg_backend_pid()"
                            )
                        )
                    ).scalar_one()
            finally:
                await killer.dispose()
            assert killed >= 1
            # No error surfaces: the dead connection is noticed and replaced.
            assert (await client.get("/api/auth/me", headers=headers)).status_code == 200

    async def test_pool_exhausted_returns_503_after_pool_timeout(self) -> None:
        async with app_client(DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0, DB_POOL_TIMEOUT=1) as (app, c):
            headers = bearer(await login(c, "admin", ADMIN_PASSWORD))
            held = await app.state.db.engine.connect()  # the only connection
            try:
                started = time.monotonic()
                response = await asyncio.wait_for(
                    c.get("/api/auth/me", headers=headers), timeout=10
                )
                elapsed = time.monotonic() - started
            finally:
                await held.close()
            error = assert_envelope(response, 503, "service_unavailable")
            assert response.headers["retry-after"]
            assert "QueuePool" not in error["message"]
            assert_no_internals(response)
            assert 0.9 <= elapsed < 5
            # Once the connection is back, the same request succeeds.
            assert (await c.get("/api/auth/me", headers=headers)).status_code == 200

    async def test_database_down_returns_503(self) -> None:
        async with app_client(DATABASE_URL=down_url()) as (_, client):
            login_response = await client.post(
                "/api/auth/login", data={"username": "admin", "password": "x" * 12}
            )
            register = await client.post(
                "/api/auth/register",
                json={"username": "someone", "email": "s@example.com", "password": "p" * 12},
            )
            live = await client.get("/health/live")
        for response in (login_response, register):
            assert_envelope(response, 503, "service_unavailable")
            assert_no_internals(response)
            assert "Connect call failed" not in response.text
        assert live.status_code == 200

    async def test_integrity_error_is_409(self, client: httpx.AsyncClient) -> None:
        body = {"username": "dupe", "email": "dupe@example.com", "password": "p" * 12}
        assert (await client.post("/api/auth/register", json=body)).status_code == 201
        again = await client.post("/api/auth/register", json=body)
        assert_envelope(again, 409, "conflict")
        assert_no_internals(again)


# ---------------------------------------------------------------- health checks


class TestHealthChecks:
    async def test_health_returns_200(self, client: httpx.AsyncClient) -> None:
        for path in ("/health", "/health/live"):
            response = await client.get(path)
            assert response.status_code == 200
            assert response.json() == {"status": "ok"}

    async def test_health_ready_includes_components(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health/ready")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] in ("healthy", "degraded")
        assert set(body["components"]) == {"database", "storage", "system"}
        database = body["components"]["database"]
        assert database["status"] in ("healthy", "degraded")
        assert database["latency_ms"] >= 0
        assert {"memory_percent", "disk_percent", "cpu_percent"} <= set(
            body["components"]["system"]["details"]
        )

    async def test_health_ready_includes_uptime_and_version(
        self, client: httpx.AsyncClient
    ) -> None:
        body = (await client.get("/health/ready")).json()
        assert body["uptime_seconds"] >= 0
        assert body["version"] == "0.1.0"
        assert body["environment"] == "test"

    async def test_details_can_be_hidden(self) -> None:
        async with app_client(HEALTH_INCLUDE_DETAILS=False) as (_, client):
            body = (await client.get("/health/ready")).json()
        assert "components" not in body and body["status"] in ("healthy", "degraded")

    async def test_health_ready_503_when_db_down(self) -> None:
        async with app_client(DATABASE_URL=down_url()) as (_, client):
            response = await client.get("/health/ready")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unhealthy"
        database = body["components"]["database"]
        assert database["status"] == "unhealthy"
        assert database["error"] == "ConnectionRefusedError"
        assert body["components"]["system"]["status"] in ("healthy", "degraded")

    async def test_health_ready_answers_within_check_timeout_when_db_hangs(
        self, blackhole_port: int
    ) -> None:
        # The database accepts TCP and never answers; connecting would wait 3 s
        # (DB_POOL_TIMEOUT bounds asyncpg's connect), readiness must answer after 1 s.
        hanging = f"postgresql+asyncpg://postgres@127.0.0.1:{blackhole_port}/x"
        settings = make_settings(DATABASE_URL=hanging, HEALTH_CHECK_TIMEOUT=1, DB_POOL_TIMEOUT=3)
        async with running_app(settings) as app, client_for(app) as client:
            started = time.monotonic()
            response = await client.get("/health/ready")
            elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert response.json()["components"]["database"]["error"] == "timeout"
        assert 0.9 <= elapsed < 2.5

    async def test_storage_not_writable_is_unhealthy(self, tmp_path: Path) -> None:
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("x")
        async with app_client(STORAGE_LOCAL_ROOT=str(blocker)) as (_, client):
            response = await client.get("/health/ready")
        assert response.status_code == 503
        storage = response.json()["components"]["storage"]
        assert storage["status"] == "unhealthy"
        assert str(blocker) not in response.text

    async def test_storage_backend_from_app_state_is_probed(self, app: FastAPI) -> None:
        class Answering:
            async def exists(self, path: str) -> bool:
                assert path.startswith("inputs/")
                return False  # absent, but the backend answered

        class Broken:
            async def exists(self, path: str) -> bool:
                raise ConnectionError("bucket unreachable at https://internal-host")

        async with client_for(app) as client:
            app.state.storage = Answering()
            healthy = await client.get("/health/ready")
            app.state.storage = Broken()
            broken = await client.get("/health/ready")
        assert healthy.status_code == 200
        assert healthy.json()["components"]["storage"]["details"] == {"backend": "Answering"}
        assert broken.status_code == 503
        assert broken.json()["components"]["storage"]["error"] == "ConnectionError"
        assert "internal-host" not in broken.text

    async def test_draining_flag_turns_readiness_503_liveness_stays(self, app: FastAPI) -> None:
        async with client_for(app) as client:
            app.state.draining = True
            ready = await client.get("/health/ready")
            live = await client.get("/health/live")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert live.status_code == 200


# ---------------------------------------------------------------- graceful behaviour


def _raw_get(port: int, path: str) -> socket.socket:
    """Send a GET and return the socket, its response not yet read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def _raw_response(port: int, request: bytes) -> httpx.Response:
    """Send raw bytes and parse the (Connection: close) answer into a Response."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        raw = _read_all(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = [(name, value) for name, _, value in (ln.partition(": ") for ln in header_lines)]
    return httpx.Response(int(status_line.split()[1]), headers=headers, content=body)


class TestGracefulBehavior:
    async def test_concurrent_requests_handled(self, client: httpx.AsyncClient) -> None:
        paths = ["/health", "/health/ready", "/api/auth/me", "/nope"] * 10
        responses = await asyncio.gather(*(client.get(p) for p in paths))
        assert [r.status_code for r in responses] == [200, 200, 401, 404] * 10

    async def test_large_response_streamed(self, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", "/openapi.json") as response:
            assert response.status_code == 200
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
        assert int(response.headers["content-length"]) == len(body) > 1000
        assert response.headers["x-content-type-options"] == "nosniff"

    def test_sigterm_drains_and_exits_zero(self) -> None:
        """deploy/entrypoint.sh -> uvicorn; SIGTERM while a slow request is in flight."""
        drain_delay = 2.5
        with real_server(
            command=[str(ROOT / "deploy" / "entrypoint.sh")],
            SHUTDOWN_DRAIN_DELAY_SECONDS=str(drain_delay),
            SHUTDOWN_GRACE_SECONDS="10",
            MIGRATION_RETRY_SECONDS="1",
        ) as (base_url, process):
            port = int(base_url.rsplit(":", 1)[1])
            assert httpx.get(f"{base_url}/health/ready").status_code == 200
            slow = _raw_get(port, "/_test/slow?seconds=4")
            # The request is accepted and parsed long before the listener closes
            # (drain delay); readiness below proves the server is still serving.
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)

            ready = None
            deadline = signalled + drain_delay
            while time.monotonic() < deadline:
                ready = httpx.get(f"{base_url}/health/ready", timeout=1)
                if ready.status_code == 503:
                    break
            assert ready is not None and ready.status_code == 503
            assert ready.json()["status"] == "draining"
            live = httpx.get(f"{base_url}/health/live", timeout=1)
            assert live.status_code == 200

            answer = _read_all(slow)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert b'"slept":4.0' in answer
            returncode = process.wait(timeout=15)
            elapsed = time.monotonic() - signalled
            output = process.stdout.read().decode() if process.stdout else ""
        assert returncode == 0, output[-3000:]
        assert elapsed < 4 + 5  # the slow request, then a bounded shutdown
        assert "app.draining" in output and "app.stopped" in output
        assert "server:" not in answer.decode().lower()  # --no-server-header

    async def test_shutdown_gives_pipeline_runs_their_drain_time(self) -> None:
        calls: list[float] = []

        class Runner:
            async def shutdown(self, drain_seconds: float) -> None:
                # The database is still there while runs drain.
                calls.append(drain_seconds)

        settings = make_settings(PIPELINE_DRAIN_SECONDS=12)
        async with running_app(settings) as app:
            app.state.runner = Runner()  # stands in for the real runner
        assert calls == [12.0]
        assert app.state.draining is True

    def test_sigterm_during_startup_stops_entrypoint(self) -> None:
        # The database never comes up: the entrypoint retries, and SIGTERM ends it.
        port = free_port()
        process = subprocess.Popen(
            [str(ROOT / "deploy" / "entrypoint.sh")],
            cwd=ROOT,
            env=server_env(
                PORT=str(port),
                DATABASE_URL=down_url(),
                MIGRATION_ATTEMPTS="100",
                MIGRATION_RETRY_SECONDS="0.2",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            assert process.stdout is not None
            seen = b""
            while b"database not ready" not in seen:  # bounded: the pipe closes on exit
                line = process.stdout.readline()
                assert line, seen.decode()[-2000:]
                seen += line
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdout:
                process.stdout.close()
        assert returncode != 0


# ---------------------------------------------------------------- authorisation


async def test_non_admin_gets_403_envelope_on_admin_endpoints(
    client: httpx.AsyncClient, make_user: Any
) -> None:
    """Criterion 20: admin-only endpoints (here /api/users) refuse other roles with 403."""
    for role in ("viewer", "analyst"):
        user = await make_user(role)
        listing = await client.get("/api/users", headers=user["headers"])
        patch = await client.patch(
            f"/api/users/{user['id']}", json={"role": "admin"}, headers=user["headers"]
        )
        assert_envelope(listing, 403, "forbidden")
        assert_envelope(patch, 403, "forbidden")


# ---------------------------------------------------------------- request validation


class TestRequestValidation:
    async def test_invalid_json_returns_422(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/api/auth/register",
            content=b'{"username": "abc", "password": ',
            headers={"Content-Type": "application/json"},
        )
        error = assert_envelope(response, 422, "validation_error")
        assert error["details"][0]["type"] == "json_invalid"
        assert "password" not in response.text.split('"location"')[0]
        assert_no_internals(response)

    async def test_missing_required_fields_returns_422(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/api/auth/register", json={"username": "abc"})
        error = assert_envelope(response, 422, "validation_error")
        missing = {d["location"] for d in error["details"] if d["type"] == "missing"}
        assert missing == {"body.email", "body.password"}

    async def test_wrong_field_types_returns_422(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/api/auth/register",
            json={"username": ["list"], "email": 12345, "password": {"nested": "secret-x"}},
        )
        error = assert_envelope(response, 422, "validation_error")
        assert {d["location"] for d in error["details"]} >= {"body.username", "body.email"}
        assert "secret-x" not in response.text and "12345" not in response.text

    async def test_wrong_query_type_returns_422(self, admin_headers: dict[str, str]) -> None:
        async with app_client() as (_, client):
            headers = bearer(await login(client, "admin", ADMIN_PASSWORD))
            response = await client.get("/api/users", params={"limit": "many"}, headers=headers)
        assert_envelope(response, 422, "validation_error")

    def test_bad_input_over_real_http(self) -> None:
        """The same refusals through uvicorn's HTTP parser, not only the ASGI test client."""

        def chunks() -> Iterator[bytes]:
            for _ in range(48):  # 3 MB against a 1 MB limit, no Content-Length
                yield b"x" * 65536

        with real_server(None, MAX_REQUEST_SIZE_MB="1") as (base, _), httpx.Client() as http:
            responses = {
                "chunked": http.post(f"{base}/api/auth/register", content=chunks()),
                # httpx will not lie about Content-Length; a raw socket will.
                "declared": _raw_response(
                    int(base.rsplit(":", 1)[1]),
                    b"POST /api/auth/register HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1099511627776\r\n"
                    b"Connection: close\r\n\r\n{}",
                ),
                "null": http.get(f"{base}/api/auth/me%00"),
                "header": http.get(
                    f"{base}/api/auth/me", headers={"Authorization": "Bearer " + "a" * 10240}
                ),
                "json": http.post(
                    f"{base}/api/auth/register",
                    content=b"{not json",
                    headers={"Content-Type": "application/json"},
                ),
            }
        expected = {
            "chunked": (413, "payload_too_large"),
            "declared": (413, "payload_too_large"),
            "null": (400, "bad_request"),
            "header": (401, "unauthorized"),
            "json": (422, "validation_error"),
        }
        for name, (status, code) in expected.items():
            assert_envelope(responses[name], status, code)
            assert_no_internals(responses[name])
            assert "server" not in responses[name].headers


# ---------------------------------------------------------------- start-up checks


class TestStartupChecks:
    @pytest.mark.parametrize(
        ("env", "fragment"),
        [
            ({"SECRET_KEY": "changeme"}, "SECRET_KEY"),
            ({"DEBUG": "true"}, "DEBUG"),
            ({"CORS_ORIGINS": "*"}, "CORS_ORIGINS"),
            ({"DATABASE_URL": "sqlite+aiosqlite:///./var/x.db"}, "SQLite"),
        ],
    )
    def test_production_refuses_to_start(self, env: dict[str, str], fragment: str) -> None:
        values = {
            "ENVIRONMENT": "production",
            "SECRET_KEY": "s" * 40,
            "DATABASE_URL": "postgresql+asyncpg://u:db-password-xyz@127.0.0.1:1/app",
            **env,
        }
        result = subprocess.run(
            [str(VENV_BIN / "uvicorn"), "backend.api.main:app", "--port", str(free_port())],
            cwd=ROOT,
            env=server_env(**values),
            capture_output=True,
            text=True,
            timeout=30,
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0
        assert "refusing to start in production" in output
        assert fragment in output
        assert "Traceback" not in output
        assert "s" * 40 not in output and "db-password-xyz" not in output

    async def test_config_summary_logged_once_and_redacted(self) -> None:
        settings = make_settings(RATE_LIMIT_STORAGE_URL="redis://:redis-pass-123@cache:6379/0")
        with structlog.testing.capture_logs() as logs:
            async with running_app(settings):
                pass
        summaries = [line for line in logs if line["event"] == "config.summary"]
        assert len(summaries) == 1
        summary = summaries[0]
        assert summary["SECRET_KEY"] == "***" and summary["ADMIN_PASSWORD"] == "***"
        assert summary["RATE_LIMIT_STORAGE_URL"] == "redis://:***@cache:6379/0"
        assert summary["DB_POOL_SIZE"] == settings.DB_POOL_SIZE
        flat = repr(summary)
        assert settings.secret_key not in flat and ADMIN_PASSWORD not in flat

    def test_bad_rate_limit_setting_refused(self) -> None:
        with pytest.raises(ValueError, match="10/minute"):
            make_settings(RATE_LIMIT_API="100 per fortnight")

    def test_summary_hides_database_password(self) -> None:
        settings = Settings(
            _env_file=None,
            ENVIRONMENT="test",
            SECRET_KEY="k" * 40,
            DATABASE_URL="postgresql://app:hunter2-secret@db:5432/loans",
        )
        summary = config_summary(settings)
        assert summary["DATABASE_URL"] == "postgresql+asyncpg://app:***@db:5432/loans"
        assert "hunter2" not in repr(summary)


# ---------------------------------------------------------------- deploy artefacts


class TestDeployArtefacts:
    def test_entrypoint_execs_uvicorn_with_proxy_and_shutdown_flags(self) -> None:
        script = (ROOT / "deploy" / "entrypoint.sh").read_text()
        assert "exec uvicorn backend.api.main:app" in script
        for flag in (
            "--proxy-headers",
            "--forwarded-allow-ips",
            "--timeout-graceful-shutdown",
            "--no-server-header",
        ):
            assert flag in script

    def test_dockerfile_is_multi_stage_non_root_with_healthcheck(self) -> None:
        dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
        assert dockerfile.count("FROM ") >= 2
        assert "\nUSER app\n" in dockerfile
        assert "HEALTHCHECK" in dockerfile and "/health/live" in dockerfile
        assert 'ENTRYPOINT ["/app/deploy/entrypoint.sh"]' in dockerfile
        assert (ROOT / ".dockerignore").read_text().count(".env") >= 1

    def test_task_definition_stop_timeout_covers_the_drain(self) -> None:
        import json

        task = json.loads((ROOT / "deploy" / "aws" / "task-definition.json").read_text())
        (container,) = task["containerDefinitions"]
        env = {item["name"]: item["value"] for item in container["environment"]}
        budget = (
            float(env["SHUTDOWN_DRAIN_DELAY_SECONDS"])
            + float(env["SHUTDOWN_GRACE_SECONDS"])
            + float(env["PIPELINE_DRAIN_SECONDS"])
        )
        assert container["stopTimeout"] >= budget + 5
        assert container["stopTimeout"] <= 120  # the ECS maximum
        assert "/health/live" in " ".join(container["healthCheck"]["command"])
        assert container["logConfiguration"]["logDriver"] == "awslogs"
        # Secrets come from Secrets Manager, never from plain environment values.
        assert {"SECRET_KEY", "DATABASE_URL"} <= {s["name"] for s in container["secrets"]}
        assert not {"SECRET_KEY", "DATABASE_URL", "ADMIN_PASSWORD"} & set(env)
