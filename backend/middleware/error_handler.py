"""Turn an exception no handler claimed into the error envelope, inside the stack.

Starlette renders unhandled exceptions in ServerErrorMiddleware, which sits
outside every user middleware: such a 500 would miss the request id, the
security headers and the access line. This layer sits innermost instead, so
the 500 (or 503 for an unreachable database) travels out through all of them.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.errors import unhandled_exception_response
from backend.observability.redaction import record_exception


class ErrorHandlerMiddleware:
    """Contract: an exception escaping the app before the response started becomes
    the envelope (500 internal_error, or 503 when the database is unavailable),
    logged with its traceback and recorded (redacted) on the current span. After the
    response started it propagates unchanged (the connection is cut)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        response_started = False

        async def send_tracking(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if response_started:
                raise
            span = trace.get_current_span()
            # Redacted: SQLAlchemy's message carries the statement (and, without
            # hide_parameters, its values); a message may quote a credential.
            record_exception(span, exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            response = unhandled_exception_response(exc)
            await response(scope, receive, send)
