"""Real processes for the executor tests: uvicorn API servers and `celery worker`s.

A gate holds runs inside their execution (claimed, lease held, phases not yet
started) until the test opens it: the executor's `before_phases` hook waits
for a file `open` in GATE_DIR and leaves `entered-<run>-<pid>` there when a run
reaches it. Processes run in sessions of their own so a test can SIGKILL a
worker with all its pool processes, as a lost host would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from backend.models import PipelineRun
from backend.tests.conftest import ADMIN_PASSWORD, TEST_BROKER_URL
from backend.tests.hardening_support import VENV_BIN, free_port, server_env
from backend.tests.obs_helpers import ROOT

DEADLINE = 60.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll `condition` until it returns something truthy (returned) or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def row(url: str, run_id: str) -> PipelineRun:
    """The run's row as the database has it now."""

    async def read() -> PipelineRun:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                query = select(PipelineRun).where(PipelineRun.id == uuid.UUID(run_id))
                found = (await conn.execute(query)).one()
                return PipelineRun(**found._mapping)
        finally:
            await engine.dispose()

    return asyncio.run(read())


class Gate:
    """The file gate of GATE_DIR, seen from the test."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def entered(self, run_id: str) -> list[int]:
        """Pids of the processes holding `run_id` at the gate (or that did)."""
        return [int(p.name.rsplit("-", 1)[1]) for p in self.folder.glob(f"entered-{run_id}-*")]

    def open(self) -> None:
        (self.folder / "open").touch()


async def wait_at_gate(run_id: uuid.UUID) -> None:
    """The hook a gated process installs: mark arrival, wait for the gate to open."""
    folder = Path(os.environ["GATE_DIR"])
    (folder / f"entered-{run_id}-{os.getpid()}").touch()
    while not (folder / "open").exists():
        await asyncio.sleep(0.02)


def process_env(tmp: Path, **overrides: str) -> dict[str, str]:
    """Settings shared by the API servers and workers of one test."""
    values = {
        "STORAGE_LOCAL_ROOT": str(tmp / "storage"),
        "CELERY_BROKER_URL": TEST_BROKER_URL,
        "PIPELINE_LEASE_SECONDS": "2",
        "OTEL_TRACES_EXPORTER": "none",
        "C_FORCE_ROOT": "1",
    }
    return server_env(**{**values, **overrides})


class Process:
    """A subprocess in its own session, its output in a file; always stopped."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.argv, self.env, self.log = argv, env, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == event]

    def kill_all(self) -> None:
        """SIGKILL the process and everything it started (a host going away)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = DEADLINE) -> int:
        """SIGTERM to the process itself (as an orchestrator sends it); its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> Process:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def api_server(tmp: Path, name: str, app: str = "backend.api.main:app", **env: str) -> Process:
    """A uvicorn process; `.url` is its base URL once `wait_ready` returned."""
    port = free_port()
    argv = [str(VENV_BIN / "uvicorn"), app, "--host", "127.0.0.1", "--port", str(port)]
    process = Process(argv, process_env(tmp, **env), tmp / f"{name}.log")
    process.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return process


def wait_ready(server: Process) -> str:
    url: str = server.url  # type: ignore[attr-defined]

    def up() -> bool:
        assert server.process is not None
        if server.process.poll() is not None:
            raise AssertionError(f"server exited: {server.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/health/live", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, f"API server {url}")
    return url


def celery_worker(tmp: Path, name: str, app: str = "backend.worker", **env: str) -> Process:
    argv = [
        str(VENV_BIN / "celery"),
        "-A",
        app,
        "--quiet",
        "worker",
        "--concurrency",
        "1",
        "-O",
        "fair",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-n",
        f"{name}@%h",
    ]
    return Process(argv, process_env(tmp, PIPELINE_EXECUTOR="celery", **env), tmp / f"{name}.log")


def wait_worker_ready(worker: Process) -> None:
    """Until the worker's pool process has set itself up (its first JSON line of that)."""

    def ready() -> bool:
        assert worker.process is not None
        if worker.process.poll() is not None:
            raise AssertionError(f"worker exited: {worker.log.read_text()[-3000:]}")
        return bool(worker.events("worker.process.started"))

    wait_for(ready, f"worker {worker.log.name}")


class Api:
    """A signed-in admin client of one API server."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=10)
        response = self.client.post(
            "/api/auth/login", data={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert response.status_code == 200, response.text
        self.client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def upload(self, name: str, content: bytes) -> str:
        response = self.client.post(
            "/api/files/upload", files={"file": (name, content, "text/csv")}
        )
        assert response.status_code == 201, response.text
        path: str = response.json()["path"]
        return path

    def submit(self, path: str) -> dict[str, Any]:
        response = self.client.post("/api/pipeline/run", json={"input_path": path})
        assert response.status_code == 202, response.text
        body: dict[str, Any] = response.json()
        return body

    def run(self, run_id: str) -> dict[str, Any]:
        response = self.client.get(f"/api/pipeline/runs/{run_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def total(self, run_id: str, what: str) -> int:
        response = self.client.get(f"/api/pipeline/runs/{run_id}/{what}")
        assert response.status_code == 200, response.text
        return int(response.json()["total"])

    def wait_finished(self, run_id: str, timeout: float = DEADLINE) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            run = self.run(run_id)
            return run if run["status"] in ("completed", "failed") else None

        result: dict[str, Any] = wait_for(finished, f"run {run_id} to finish", timeout)
        return result

    def close(self) -> None:
        self.client.close()
