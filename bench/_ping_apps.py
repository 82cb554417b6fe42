"""The ASGI apps bench/http_overhead.py serves, each with the same route: `bare`
(FastAPI() and nothing else), `full` (create_app(), the whole production stack), and
`busy`: bare with BUSY_MICROSECONDS of CPU burnt per request (the control that tells
the cost of doing that much work per request from pauses in the full stack)."""

from __future__ import annotations

import os
import time

from fastapi import FastAPI

from backend.api.main import create_app


async def ping() -> dict[str, bool]:
    return {"ok": True}


bare = FastAPI()
bare.add_api_route("/api/ping", ping, methods=["GET"])

full = create_app()
full.add_api_route("/api/ping", ping, methods=["GET"])


BUSY_SECONDS = float(os.environ.get("BUSY_MICROSECONDS", "0")) / 1e6


async def busy_ping() -> dict[str, bool]:
    deadline = time.perf_counter() + BUSY_SECONDS
    while time.perf_counter() < deadline:
        pass
    return {"ok": True}


busy = FastAPI()
busy.add_api_route("/api/ping", busy_ping, methods=["GET"])
