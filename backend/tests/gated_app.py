"""The production app with the test gate in front of every run's phases (in-process executor).

`uvicorn backend.tests.gated_app:app`, with GATE_DIR set: see worker_support.Gate.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from backend.api.main import create_app
from backend.tests.worker_support import wait_at_gate


def build() -> FastAPI:
    application = create_app()
    serve = application.router.lifespan_context

    @asynccontextmanager
    async def gated(app: FastAPI) -> AsyncIterator[None]:
        async with serve(app):
            app.state.runner.before_execute = wait_at_gate
            yield

    application.router.lifespan_context = gated
    return application


app = build()
