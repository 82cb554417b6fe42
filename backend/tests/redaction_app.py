"""The production app plus routes that try to leak, for the redaction tests' real servers.

`uvicorn backend.tests.redaction_app:app` builds it from the environment, like the real one.
Each route plants a marker the tests then look for in stdout and the exported spans.
"""

from __future__ import annotations

import signal

import structlog
from fastapi import FastAPI, Request
from opentelemetry import trace
from sqlalchemy import text

from backend.api.main import create_app

# Values the leaking routes use; none of them may appear in a log line or a span.
DB_PARAMETER = "param-marker-Zq81vN"
CRASH_PASSWORD = "pw-marker-Kx3mTd"
CRASH_BEARER = "tok-marker-Vb72aQpL"
HARMLESS: dict[str, str | int] = {
    "token_type": "bearer",
    "max_tokens": 5,
    "password_min_length": 12,
    "secretary": "Ms Moneypenny",
    "ACCESS_TOKEN_EXPIRE_MINUTES": 30,
}

log = structlog.get_logger("backend.tests.redaction_app")


def build() -> FastAPI:
    application = create_app()

    @application.get("/api/test/db-error")
    async def db_error(request: Request) -> None:
        """A statement that fails with a parameter bound: SQLAlchemy's error text
        would carry `[parameters: (...)]`."""
        async with request.app.state.db.session() as session:
            await session.execute(
                text("SELECT missing_column FROM no_such_table WHERE x = :p"),
                {"p": DB_PARAMETER},
            )

    @application.get("/api/test/leaky-crash")
    async def leaky_crash() -> None:
        """An unhandled exception whose message quotes credentials (500 envelope)."""
        raise RuntimeError(
            f"login to upstream failed: password={CRASH_PASSWORD} "
            f"Authorization: Bearer {CRASH_BEARER}"
        )

    @application.get("/api/test/harmless")
    async def harmless() -> dict[str, str]:
        """Keys that merely mention a credential, on a log line and on the span."""
        log.info("redaction.harmless", **HARMLESS)
        span = trace.get_current_span()
        for key, value in HARMLESS.items():
            span.set_attribute(f"app.{key}", value)
        span.set_attribute("app.password", CRASH_PASSWORD)
        return {"status": "logged"}

    @application.get("/api/test/terminate")
    async def terminate() -> dict[str, str]:
        """SIGTERM this process from inside a request that has a user and a run bound.

        `raise_signal` delivers to this (the event loop's) thread, so Python runs the
        handler at the next bytecode: inside this request's context.
        """
        structlog.contextvars.bind_contextvars(user="sigterm-victim", run_id="run-in-flight")
        signal.raise_signal(signal.SIGTERM)
        return {"status": "signalled"}

    return application


def __getattr__(name: str) -> FastAPI:
    # Built on first access (by uvicorn), so the tests can import the markers above
    # without reading the environment or creating an app.
    if name == "app":
        application = build()
        globals()["app"] = application
        return application
    raise AttributeError(name)
