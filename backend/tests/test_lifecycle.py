"""Graceful shutdown under load: a real uvicorn process, SIGTERM, keep-alive clients.

The scenario is the one a rolling deploy produces behind the ALB: clients hold
keep-alive connections and keep sending on them while the process drains.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backend.models import RunStatus
from backend.tests.pipeline_support import KNOWN_TAPE
from backend.tests.worker_support import (
    DEADLINE,
    Api,
    Gate,
    api_server,
    row,
    wait_for,
    wait_ready,
)

CLIENTS = 8
DRAIN_DELAY_SECONDS = 1.5
# Successful requests before SIGTERM (the load is steady) and after it (served while
# draining; each on a new connection then, so fewer per second on a busy machine).
MIN_BEFORE_SIGTERM = 50
MIN_AFTER_SIGTERM = 40


@dataclass
class Tally:
    """What the load saw, split at the moment SIGTERM was sent."""

    signalled_at: float | None = None
    before: int = 0
    after: int = 0
    last_success: float = 0.0
    refused: int = 0
    failures: list[str] = field(default_factory=list)


async def keep_asking(url: str, token: str, tally: Tally, deadline: float) -> None:
    """One client: sequential requests over its own keep-alive pool, until refused.

    httpx never retries a request whose connection broke, so every reset shows.
    """
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as client:
        while time.monotonic() < deadline:
            try:
                response = await client.get("/api/auth/me")
            except httpx.ConnectError as exc:
                if tally.signalled_at is None:
                    tally.failures.append(f"before SIGTERM: {exc!r}")
                    continue
                # The listener is gone: a NEW connection was refused. The server
                # stopped accepting, as it must once drained; nothing was sent.
                tally.refused += 1
                return
            except httpx.HTTPError as exc:
                # A request sent and never answered: reset, EOF before the response,
                # a broken write, a timeout.
                tally.failures.append(repr(exc))
                continue
            if response.status_code != 200:
                tally.failures.append(f"status {response.status_code}: {response.text[:200]}")
            elif tally.signalled_at is None:
                tally.before += 1
            else:
                tally.after += 1
                tally.last_success = time.monotonic()
        tally.failures.append("still answered at the deadline")


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll `condition()` on the running loop until it is true, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def test_sigterm_under_keep_alive_load_fails_no_request(clean_db: str, tmp_path: Path) -> None:
    """SIGTERM to a uvicorn process serving CLIENTS keep-alive clients: no request fails.

    Each client sends `GET /api/auth/me` (JWT and a database read) one after the
    other over its own keep-alive pool, from before the signal until the server
    stops accepting. A pipeline run is held mid-execution at the file gate.

    Counted as a failure: any request that was sent and not answered 200 (a
    connection reset, EOF before the response, a broken write, a timeout, any
    other status), and a refused connection before SIGTERM. Not a failure: a
    NEW connection refused after SIGTERM (the listener is closed; nothing was
    sent, and that client stops there).

    Also required: plenty of requests served across the drain, exit code 0, and
    the held run handed back (queued, its lease ended).
    """
    gate = Gate(tmp_path / "gate")
    server = api_server(
        tmp_path,
        "api",
        "backend.tests.gated_app:app",
        GATE_DIR=str(gate.folder),
        SHUTDOWN_DRAIN_DELAY_SECONDS=str(DRAIN_DELAY_SECONDS),
        PIPELINE_DRAIN_SECONDS="1",
        PIPELINE_LEASE_SECONDS="30",
    )
    with server:
        api = Api(wait_ready(server))
        try:
            run_id = api.submit(api.upload("known.csv", KNOWN_TAPE))["run_id"]
            token = str(api.client.headers["Authorization"]).removeprefix("Bearer ")
        finally:
            api.close()
        wait_for(lambda: gate.entered(run_id), "the run to reach the gate")

        async def scenario() -> Tally:
            tally = Tally()
            deadline = time.monotonic() + DEADLINE
            clients = [
                asyncio.create_task(keep_asking(api.url, token, tally, deadline))
                for _ in range(CLIENTS)
            ]
            await wait_until(lambda: tally.before >= MIN_BEFORE_SIGTERM, "steady load")
            assert server.process is not None
            tally.signalled_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.gather(*clients)
            return tally

        tally = asyncio.run(scenario())
        assert server.process is not None
        returncode = server.process.wait(timeout=DEADLINE)
        log = server.log.read_text(errors="replace")

        assert tally.failures == [], (len(tally.failures), tally.failures[:10])
        assert tally.after >= MIN_AFTER_SIGTERM, tally
        # Served through the whole drain delay, up to the listener closing.
        assert tally.signalled_at is not None
        assert tally.last_success - tally.signalled_at >= DRAIN_DELAY_SECONDS, tally
        assert tally.refused == CLIENTS, tally
        assert returncode == 0, log[-3000:]
        assert server.events("app.draining") and server.events("app.stopped")
        (closed,) = server.events("app.listener.closed")
        assert closed["awaiting_first_request"] == 0, closed
        assert server.events("pipeline.run.handed_back"), log[-3000:]
        back = row(clean_db, run_id)
        assert back.status == RunStatus.QUEUED
        assert back.lease_expires_at is not None
        assert back.lease_expires_at.timestamp() <= time.time()
        assert back.attempts == 1
