"""Production hardening: database pool behaviour, readiness, graceful shutdown,
request validation and start-up checks, each over HTTP or at process level."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from backend.config import Settings, config_summary
from backend.tests.conftest import (
    ADMIN_PASSWORD,
    TEST_DATABASE_URL,
    TEST_SECRET,
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
    http_scope,
    real_server,
    running_app,
    server_env,
)
from backend.tests.obs_helpers import json_lines
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

    async def test_duplicate_registration_reveals_nothing(self, client: httpx.AsyncClient) -> None:
        body = {"username": "dupe", "email": "dupe@example.com", "password": "p" * 12}
        first = await client.post("/api/auth/register", json=body)
        again = await client.post("/api/auth/register", json=body)
        assert (first.status_code, again.status_code) == (202, 202)
        assert again.json() == first.json()
        assert_no_internals(again)

    async def test_taken_team_name_is_409(
        self, client: httpx.AsyncClient, admin_headers: dict[str, str]
    ) -> None:
        for expected in (201, 409):
            response = await client.post(
                "/api/teams", json={"name": "Dupes"}, headers=admin_headers
            )
            assert response.status_code == expected
        assert_envelope(response, 409, "team_name_taken")
        assert_no_internals(response)


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

    async def test_large_response_streamed(
        self, app: FastAPI, admin_headers: dict[str, str]
    ) -> None:
        """A multi-MB download leaves the whole middleware stack as a stream of chunks
        (no layer buffers the body) and arrives complete."""
        import hashlib

        from backend.storage.base import CHUNK_SIZE

        size = 6 * CHUNK_SIZE + 12345
        content = hashlib.shake_256(b"loan tape").digest(size)

        async def produce() -> AsyncIterator[bytes]:
            for start in range(0, size, 256 * 1024):
                yield content[start : start + 256 * 1024]

        await app.state.storage.save("inputs/big-tape.csv", produce())
        # Straight through ASGI: an HTTP client would hide how the body was sent.
        messages: list[dict[str, Any]] = []
        finished = asyncio.Event()
        asked = False

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await finished.wait()  # the client stays connected until the last byte
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished.set()

        scope = http_scope(
            "/api/files/download",
            query=b"path=inputs/big-tape.csv",
            headers=[(b"authorization", admin_headers["Authorization"].encode())],
        )
        await asyncio.wait_for(app(scope, receive, send), timeout=60)  # type: ignore[arg-type]

        start, *bodies = messages
        assert start["status"] == 200
        headers = {key.decode(): value.decode() for key, value in start["headers"]}
        assert headers["x-content-type-options"] == "nosniff"
        assert "x-request-id" in headers and "server-timing" in headers
        chunks = [m["body"] for m in bodies if m["body"]]
        # Streamed: many pieces, none larger than the storage chunk, only the last final.
        assert len(chunks) >= 6
        assert max(len(chunk) for chunk in chunks) <= CHUNK_SIZE
        assert all(m.get("more_body") for m in bodies[:-1]) and not bodies[-1].get("more_body")
        received = b"".join(chunks)
        assert len(received) == size
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(content).hexdigest()

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
            """Records the drain time it is given, then stops the real runner at once."""

            def __init__(self, real: Any) -> None:
                self.real = real

            async def shutdown(self, drain_seconds: float) -> None:
                # The database is still there while runs drain.
                calls.append(drain_seconds)
                await self.real.shutdown(drain_seconds=0)

        settings = make_settings(PIPELINE_DRAIN_SECONDS=12)
        async with running_app(settings) as app:
            app.state.runner = Runner(app.state.runner)  # stands in for the real runner
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
            "SECRET_KEY": TEST_SECRET,
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
        assert TEST_SECRET not in output and "db-password-xyz" not in output

    async def test_config_summary_logged_once_and_redacted(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        settings = make_settings(
            RATE_LIMIT_STORAGE_URL="redis://:redis-pass-123@cache:6379/0",
            STORAGE_LOCAL_ROOT=str(tmp_path / "storage"),
        )
        capsys.readouterr()
        async with running_app(settings):
            pass
        # The line as written to stdout, after every processor (redaction included).
        output = capsys.readouterr().out
        summaries = [line for line in json_lines(output) if line["event"] == "config.summary"]
        assert len(summaries) == 1
        summary = summaries[0]
        assert summary["SECRET_KEY"] == "[REDACTED]" and summary["ADMIN_PASSWORD"] == "[REDACTED]"
        assert summary["RATE_LIMIT_STORAGE_URL"] == "redis://:[REDACTED]@cache:6379/0"
        assert summary["DB_POOL_SIZE"] == settings.DB_POOL_SIZE
        assert summary["ACCESS_TOKEN_EXPIRE_MINUTES"] == settings.ACCESS_TOKEN_EXPIRE_MINUTES
        for secret in (settings.secret_key, ADMIN_PASSWORD, "redis-pass-123"):
            assert secret not in output

    def test_bad_rate_limit_setting_refused(self) -> None:
        with pytest.raises(ValueError, match="10/minute"):
            make_settings(RATE_LIMIT_API="100 per fortnight")

    def test_summary_hides_database_password(self) -> None:
        settings = Settings(
            _env_file=None,
            ENVIRONMENT="test",
            SECRET_KEY=TEST_SECRET,
            DATABASE_URL="postgresql://app:hunter2-secret@db:5432/loans",
        )
        summary = config_summary(settings)
        assert summary["DATABASE_URL"] == "postgresql+asyncpg://app:[REDACTED]@db:5432/loans"
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
            "--timeout-keep-alive",
            "--no-server-header",
        ):
            assert flag in script

    def test_dockerfile_is_multi_stage_non_root_with_healthcheck(self) -> None:
        dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
        assert dockerfile.count("FROM ") >= 2
        assert "\nUSER 10001:10001\n" in dockerfile  # the app user, numerically
        assert "HEALTHCHECK" in dockerfile and "/health/live" in dockerfile
        assert 'ENTRYPOINT ["/app/deploy/entrypoint.sh"]' in dockerfile
        assert (ROOT / ".dockerignore").read_text().count(".env") >= 1

    # The ECS task definitions and their timing budget: test_deploy.py.


# ---------------------------------------------------------------- admin CLI


async def run_cli(*args: str, stdin: str | None = None, **env: str) -> tuple[int, str, str]:
    """`python -m backend.admin.cli ARGS` against the test database: (exit code, stdout, stderr).

    A separate process, as an operator runs it; bounded by a timeout and killed on expiry.
    """
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backend.admin.cli",
        *args,
        cwd=ROOT,
        env=server_env(**env),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin is not None else None), timeout=60
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"cli {args} did not finish within 60 s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    """The failure is told in one `error:` line; the only other lines are JSON log lines."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert all(line.startswith("{") for line in lines if line not in errors), stderr
    assert "Traceback" not in stderr


@pytest.fixture
async def scratch_database() -> AsyncIterator[str]:
    """An empty database next to the test database (never migrated), dropped afterwards."""
    import uuid

    from sqlalchemy.engine import make_url

    url = make_url(TEST_DATABASE_URL)
    name = f"{url.database}_cli_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(
        url.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


class TestAdminCLI:
    async def test_list_users_command(
        self, client: httpx.AsyncClient, make_user: Any, admin_headers: dict[str, str]
    ) -> None:
        import json

        analyst = await make_user("analyst", username="ana.lyst")
        viewer = await make_user("viewer", username="vic-viewer")
        deactivated = await client.patch(
            f"/api/users/{viewer['id']}", json={"is_active": False}, headers=admin_headers
        )
        assert deactivated.status_code == 200

        code, out, err = await run_cli("list-users", "--json")
        assert code == 0, err
        users = json.loads(out)  # stdout is the document alone: logs go to stderr
        assert [(u["username"], u["role"], u["is_active"]) for u in users] == [
            ("admin", "admin", True),
            ("ana.lyst", "analyst", True),
            ("vic-viewer", "viewer", False),
        ]
        assert users[1]["id"] == analyst["id"]
        assert users[1]["email"] == "ana.lyst@example.com"
        assert "hashed_password" not in out and "$2b$" not in out

        code, out, err = await run_cli("list-users", "--role", "analyst", "--json")
        assert code == 0, err
        assert [u["username"] for u in json.loads(out)] == ["ana.lyst"]

        code, out, err = await run_cli("list-users")
        assert code == 0, err
        for header in ("ID", "Username", "Email", "Role", "Active"):
            assert header in out
        (viewer_row,) = [line for line in out.splitlines() if "vic-viewer" in line]
        assert "vic-viewer@example.com" in viewer_row and " no " in viewer_row
        assert "Total: 3 users" in out

        code, _, err = await run_cli("list-users", "--role", "superuser")
        assert code == 2 and "superuser" in err

    async def test_create_user_command(self, client: httpx.AsyncClient) -> None:
        password = "a-long-enough-password-1"
        code, _, err = await run_cli(
            "create-user", "carol", "Carol@Example.com", "--role", "analyst", "--password-stdin",
            stdin=password + "\n",
        )  # fmt: skip
        assert code == 0, err
        assert "created user" in err and "carol" in err and password not in err
        # The account works: the API accepts the password and reports the role.
        token = await login(client, "carol", password)
        me = (await client.get("/api/auth/me", headers=bearer(token))).json()
        assert (me["email"], me["role"]) == ("carol@example.com", "analyst")

        code, _, err = await run_cli(
            "create-user", "carol", "other@example.com", "--password-stdin", stdin=password
        )
        assert code == 1
        assert_one_error_line(err, "already registered")

        code, out, err = await run_cli(
            "create-user", "dave", "dave@example.com", "--password-stdin", stdin="short\n"
        )
        assert code == 2
        assert_one_error_line(err, "password")
        assert "short" not in (out + err).replace("at least", "")

    async def test_run_stats_command(self) -> None:
        import json
        import uuid
        from datetime import UTC, datetime, timedelta

        from sqlalchemy import insert

        from backend.models import PipelineRun, RunStatus

        now = datetime.now(UTC)
        runs = [
            # (status, total, eligible, exceptions, age in minutes)
            (RunStatus.COMPLETED, 100, 80, 25, 30),
            (RunStatus.COMPLETED, 50, 50, 0, 20),
            (RunStatus.FAILED, 0, 0, 0, 10),
            (RunStatus.INTERRUPTED, 7, 3, 4, 1),
        ]
        ids = [uuid.uuid4() for _ in runs]
        engine = create_async_engine(TEST_DATABASE_URL, poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                for run_id, (status, total, eligible, exceptions, age) in zip(
                    ids, runs, strict=True
                ):
                    created = now - timedelta(minutes=age)
                    await conn.execute(
                        insert(PipelineRun).values(
                            id=run_id,
                            status=status,
                            input_path=f"inputs/tape-{age}.csv",
                            total_loans=total,
                            eligible_loans=eligible,
                            ineligible_loans=total - eligible,
                            rejected_loans=0,
                            exception_count=exceptions,
                            phase_durations={},
                            created_at=created,
                            started_at=created,
                            finished_at=created + timedelta(seconds=12.5),
                        )
                    )
        finally:
            await engine.dispose()

        code, out, err = await run_cli("run-stats", "--json", "--last", "2")
        assert code == 0, err
        stats = json.loads(out)
        assert stats["by_status"] == {
            "queued": 0,
            "running": 0,
            "completed": 2,
            "failed": 1,
            "interrupted": 1,
        }
        assert stats["total_runs"] == 4
        assert (stats["total_loans"], stats["eligible_loans"], stats["exceptions"]) == (
            157,
            133,
            29,
        )
        # Newest first, limited to --last.
        assert [r["id"] for r in stats["recent_runs"]] == [str(ids[3]), str(ids[2])]
        assert stats["recent_runs"][0]["duration_seconds"] == 12.5

        code, out, err = await run_cli("run-stats")
        assert code == 0, err
        # The counts table's row (the latest-runs table starts its rows with a run id).
        (completed,) = [line for line in out.splitlines() if line.startswith("│ completed")]
        assert completed.split("│")[2].strip() == "2"
        assert "Total loans:      157" in out
        assert "Exceptions:       29" in out
        assert str(ids[0]) in out  # the default --last 10 lists all four

    async def test_db_status_command(self, scratch_database: str) -> None:
        import json

        from backend.migrations.runner import head_revisions

        code, out, err = await run_cli("db-status", "--json", DB_POOL_SIZE="3")
        assert code == 0, err
        status = json.loads(out)
        assert status["reachable"] is True and status["error"] is None
        assert (status["dialect"], status["driver"]) == ("postgresql", "asyncpg")
        assert status["current_revision"] == status["head_revision"] == list(head_revisions())
        assert status["at_head"] is True
        assert 0 < status["latency_ms"] < 5000
        assert status["server_version"].split(".")[0].isdigit()
        assert status["pool"]["size"] == 3 and status["pool"]["pre_ping"] is True

        code, out, err = await run_cli("db-status")
        assert code == 0, err
        assert "OK" in out and "at head" in out and "Latency" in out

        # Reachable but never migrated: reported, and exit code 1 for scripts and probes.
        code, out, err = await run_cli("db-status", "--json", DATABASE_URL=scratch_database)
        assert code == 1
        assert json.loads(out)["current_revision"] == []
        assert_one_error_line(err, "not at the migration head")

        # Unreachable: one clear line, no traceback, the password never shown.
        down = f"postgresql+asyncpg://postgres:hunter2-secret@127.0.0.1:{closed_port()}/x"
        started = time.monotonic()
        code, out, err = await run_cli("db-status", "--timeout", "5", DATABASE_URL=down)
        assert code == 1
        assert time.monotonic() - started < 30
        assert "FAILED" in out
        assert_one_error_line(err, "database unreachable", "ConnectionRefused")
        assert "hunter2-secret" not in out + err

    @pytest.mark.parametrize(
        ("url", "reason"),
        [
            ("postgresql+asyncpg://postgres:hunter2-secret@127.0.0.1:{port}/x", "Connect"),
            ("not a database url hunter2-secret", "Could not parse"),
            ("mysql://root:hunter2-secret@127.0.0.1/x", "No module named"),  # no driver
        ],
    )
    async def test_database_errors_are_one_line_for_every_command(
        self, url: str, reason: str
    ) -> None:
        url = url.format(port=closed_port())
        commands = (["list-users"], ["run-stats"], ["migrate"], ["seed-admin"], ["db-status"])
        for args in commands:
            code, out, err = await run_cli(*args, DATABASE_URL=url)
            assert code == 1, (args, err)
            assert_one_error_line(err, reason)
            assert "hunter2-secret" not in out + err

    async def test_cli_log_lines_are_json(self) -> None:
        import json

        # `migrate` on a database already at head still logs (Alembic's own lines).
        code, _, err = await run_cli("migrate")
        assert code == 0, err
        logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert logs, err
        for line in logs:
            assert {"timestamp", "level", "logger", "event", "service", "environment"} <= set(line)
            assert line["environment"] == "test"
        assert any(line["logger"].startswith("alembic") for line in logs)


# ---------------------------------------------------------------- storage paths and names


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


class TestPathUtils:
    """The storage layer's path check (`parse_path`, its `safe_join`) and `sanitize_filename`
    on the names production sees; test_storage.py covers the traversal catalogue."""

    PRODUCTION_PATHS = (
        "inputs/2026/11/22/servicer-acme/tape_2026-11-22T05-30-00Z.csv",
        "inputs/servicer acme/Q4 2026 (final).csv.gz",
        "outputs/5f0c2a8e-3b1d-4c8e-9f7a-2d4e6b8a0c1e/report.json",
        "outputs/5f0c2a8e-3b1d-4c8e-9f7a-2d4e6b8a0c1e/exceptions/part-0001.csv",
        "inputs/a.b.c/..hidden-but-not-parent.csv",
        "inputs/r\u00e9sum\u00e9/\u30c6\u30fc\u30d7.csv",
    )

    async def test_safe_join_with_production_paths(
        self, tmp_path: Path, s3_bucket: str, moto_endpoint: str
    ) -> None:
        import boto3

        from backend.storage.base import InvalidPath, parse_path, parse_prefix
        from backend.storage.local import LocalStorage
        from backend.storage.s3 import S3Storage

        for path in self.PRODUCTION_PATHS:
            checked = parse_path(path)
            area, key = path.split("/", 1)
            assert (checked.area, checked.key, str(checked)) == (area, key, path)
            assert checked.name == path.rsplit("/", 1)[-1]
        # A bare key joined onto an area, and a folder prefix for listings.
        assert str(parse_path("2026/11/tape.csv", area="inputs")) == "inputs/2026/11/tape.csv"
        assert parse_prefix("outputs", "5f0c2a8e/") == ("outputs", "5f0c2a8e/")

        # Joined onto the real backends: under the root folder, under the bucket prefix
        # (whose stray slashes are dropped: "/prod/loan-engine/" -> "prod/loan-engine").
        local = LocalStorage(tmp_path / "root")
        s3 = S3Storage(s3_bucket, prefix="/prod/loan-engine/", endpoint_url=moto_endpoint)
        try:
            for path in self.PRODUCTION_PATHS[:4]:
                for backend in (local, s3):
                    info = await backend.save(path, _one_chunk(path.encode()))
                    assert (info.path, info.size) == (path, len(path.encode()))
            client = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint)
            listed = client.list_objects_v2(Bucket=s3_bucket)["Contents"]
            client.close()
        finally:
            await s3.close()
        assert sorted(o["Key"] for o in listed) == sorted(
            f"prod/loan-engine/{p}" for p in self.PRODUCTION_PATHS[:4]
        )
        for path in self.PRODUCTION_PATHS[:4]:
            assert (local.root / path).read_bytes() == path.encode()

        escapes = (
            "inputs/2026/../../etc/passwd",
            "inputs/2026/%2e%2e/%2e%2e/etc/passwd",
            "outputs/run/..%252f..%252fsecret.csv",
            "inputs/\uff0e\uff0e/outputs/x.csv",  # full-width dots
            "inputs//x.csv",
            "inputs/./x.csv",
            "/inputs/x.csv",
            "C:/inputs/x.csv",
            "inputs\\..\\x.csv",
            "inputs/x.csv\x00.json",
            "s3://bucket/inputs/x.csv",
            "var/inputs/x.csv",
            "inputs",
            "inputs/" + "a" * 600 + ".csv",
        )
        for path in escapes:
            with pytest.raises(InvalidPath):
                parse_path(path)
        with pytest.raises(InvalidPath):
            await local.save("inputs/2026/../../../escape.csv", _one_chunk(b"x"))
        assert not (tmp_path / "escape.csv").exists()

    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            # unicode: look-alikes folded, the rest replaced; never an empty stem
            ("\uff34\uff41\uff50\uff45.csv", "Tape.csv"),
            ("r\u00e9sum\u00e9 2026.csv", "r_sum_2026.csv"),
            ("\U0001f4c8.csv", "file.csv"),
            ("invoice\u202ecsv.exe", "invoice_csv.exe"),  # right-to-left override
            # spaces
            ("  my tape .csv  ", "my_tape_.csv"),
            ("loan tape\u00a0v2.csv", "loan_tape_v2.csv"),
            # dots
            ("tape.csv.", "tape.csv"),
            ("...tape.csv", "tape.csv"),
            ("tape..csv", "tape..csv"),
            ("archive.2026.11.csv.gz", "archive.2026.11.csv.gz"),
            ("-rf.csv", "rf.csv"),
            # reserved device names (Windows clients cannot save them)
            ("CON.csv", "_CON.csv"),
            ("nul", "_nul"),
            ("lpt9.csv.gz", "_lpt9.csv.gz"),
            ("CONSOLE.csv", "CONSOLE.csv"),
            ("COM10.csv", "COM10.csv"),
        ],
    )
    def test_sanitize_filename_edge_cases(self, given: str, expected: str) -> None:
        from backend.storage.base import sanitize_filename

        assert sanitize_filename(given) == expected

    def test_sanitize_filename_long_and_empty_names(self) -> None:
        from backend.storage.base import MAX_NAME_LENGTH, InvalidPath, sanitize_filename

        safe = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
        long_names = {
            "a" * 400 + ".csv": ".csv",
            "Q4." + "b" * 400 + ".csv.gz": ".csv.gz",  # a dot early in a long name
            "tape." + "x" * 300: "x",  # no short extension to keep: just cut
            "a\u00e9" * 200 + ".csv": ".csv",  # each "\u00e9" becomes "_"
        }
        for given, ending in long_names.items():
            name = sanitize_filename(given)
            assert len(name) == MAX_NAME_LENGTH, name
            assert name.endswith(ending) and safe.match(name), name
        for empty in ("", "...", " ", "___", "\u00e9\u00e9", ". . ."):
            with pytest.raises(InvalidPath):
                sanitize_filename(empty)
