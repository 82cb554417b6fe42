"""Helpers for the hardening tests: in-process apps with chosen settings, real servers.

Real servers run `uvicorn` (or deploy/entrypoint.sh) in a subprocess on a free
port; they are always stopped, and never outlive the test that started them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from opentelemetry.sdk.trace.export import SpanExporter

from backend.api.main import create_app
from backend.config import Settings
from backend.tests.conftest import (
    ADMIN_PASSWORD,
    TEST_DATABASE_URL,
    TEST_SECRET,
    TEST_STORAGE_ROOT,
    make_settings,
)

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def unique_prefix() -> str:
    """A Redis key prefix no other test (or parallel suite) uses."""
    return f"test-hardening:{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def closed_port() -> int:
    """A local port nothing listens on (connections are refused)."""
    return free_port()


def client_for(app: FastAPI, ip: str = "203.0.113.10") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@asynccontextmanager
async def running_app(
    settings: Settings, exporter: SpanExporter | None = None
) -> AsyncIterator[FastAPI]:
    """An app with its lifespan running (database engine, start time, drain flag);
    its spans go to `exporter` when one is given."""
    app = create_app(settings, span_exporter=exporter)
    async with app.router.lifespan_context(app):
        yield app


@asynccontextmanager
async def app_client(
    ip: str = "203.0.113.10", exporter: SpanExporter | None = None, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = make_settings(**overrides)
    async with running_app(settings, exporter) as app, client_for(app, ip) as client:
        yield app, client


def server_env(**overrides: str) -> dict[str, str]:
    """Environment for a server subprocess: test settings, no .env surprises."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.isupper() or key in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        ENVIRONMENT="test",
        SECRET_KEY=TEST_SECRET,
        DATABASE_URL=TEST_DATABASE_URL,
        BCRYPT_ROUNDS="4",
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        RATE_LIMIT_ENABLED="false",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
        # Never the repository's ./var (the server runs in the repository root).
        STORAGE_LOCAL_ROOT=TEST_STORAGE_ROOT,
    )
    env.update(overrides)
    return env


def wait_until_up(base_url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Poll /health/live until it answers 200 (bounded); fail if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"server exited with {process.returncode}: {out[-3000:]}")
        try:
            if httpx.get(f"{base_url}/health/live", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    out = process.stdout.read().decode() if process.stdout else ""
    raise AssertionError(f"server at {base_url} did not come up within {timeout}s: {out[-3000:]}")


@contextmanager
def real_server(
    command: list[str] | None = None, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A uvicorn process (or `command`, given the port in $PORT) on a free port."""
    port = free_port()
    argv = command or [
        str(VENV_BIN / "uvicorn"),
        "backend.api.main:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-server-header",
        "--timeout-graceful-shutdown",
        "10",
    ]
    process = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=server_env(PORT=str(port), HOST="127.0.0.1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base_url, process)
        yield base_url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if process.stdout:
            process.stdout.close()


def http_scope(
    path: str,
    *,
    query: bytes = b"",
    headers: Iterable[tuple[bytes, bytes]] = (),
    host: str = "testserver",
    client: tuple[str, int] = ("203.0.113.10", 1),
) -> dict[str, Any]:
    """A plain ASGI HTTP GET scope, for calling an app directly: messages an HTTP client
    would refuse to send, or a request with no HTTP in between."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", host.encode()), *headers],
        "client": client,
        "server": (host, 80),
    }
