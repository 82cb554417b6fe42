"""An app for real-server tests: the production app plus a route that raises.

`uvicorn backend.tests.boom_app:app` builds it from the environment, like the real one.
"""

from __future__ import annotations

from fastapi import FastAPI

from backend.api.main import create_app


def build() -> FastAPI:
    application = create_app()

    @application.get("/api/test/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom in a real server")

    return application


app = build()
