"""Body size, URL hygiene and time limits for every HTTP request (pure ASGI)."""

from __future__ import annotations

import asyncio
import re
import time
from urllib.parse import unquote_to_bytes

import structlog
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.errors import error_response

logger = structlog.get_logger(__name__)

MB = 1024 * 1024
UPLOAD_PREFIX = "/api/files/upload"
# C0 controls (NUL included) and DEL: never legitimate in a path or query.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class _BodyTooLarge(BaseException):
    """Raised into the app when the streamed body passes the limit, after the 413 went out.

    A BaseException, so that nothing between here and the app's body read claims it:
    FastAPI turns any Exception raised while reading the body into a 400 and the
    error handlers would log that 400 after the 413. Only this layer catches it.
    """


class _BodyTooLateToRefuse(Exception):
    """The body passed the limit after the app had started its response."""


def has_control_chars(scope: Scope) -> bool:
    """Whether the decoded path or query carries a NUL or another control character."""
    # The server has already percent-decoded the path; the query is still raw bytes.
    path: str = scope.get("path", "")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        return True
    query: bytes = scope.get("query_string", b"")
    return bool(_CONTROL.search(unquote_to_bytes(query)))


class RequestLimitsMiddleware:
    """Rejects oversized or malformed requests and bounds how long one may run.

    Contract:
    - a declared Content-Length above the limit -> 413 before the app runs;
      a streamed (chunked) body -> 413 as soon as the bytes received pass the
      limit, and the app's own response is discarded. Uploads under
      /api/files/upload use `max_upload_bytes`, everything else `max_body_bytes`;
    - a non-numeric Content-Length, or control characters in path or query -> 400;
    - a request still running after `timeout_seconds` is cancelled -> 504 (when
      nothing was sent yet), logged, and the current span marked as an error.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        timeout_seconds: float,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.timeout_seconds = timeout_seconds

    def limit_for(self, path: str) -> int:
        return self.max_upload_bytes if path.startswith(UPLOAD_PREFIX) else self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        if has_control_chars(scope):
            logger.info("http.error", code="bad_request", status_code=400, reason="control_chars")
            await error_response(400, "bad_request", "Invalid characters in URL")(
                scope, receive, send
            )
            return

        limit = self.limit_for(scope.get("path", ""))
        declared = _content_length(scope)
        if declared == -1:
            await error_response(400, "bad_request", "Invalid Content-Length header")(
                scope, receive, send
            )
            return
        if declared is not None and declared > limit:
            await self._too_large(scope, receive, send, limit)
            return

        received = 0
        response_started = False
        rejected = False

        async def send_guarded(message: Message) -> None:
            nonlocal response_started
            if rejected:
                # The 413 already went out; whatever the app says afterwards is dropped.
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        async def receive_counted() -> Message:
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if response_started:
                        raise _BodyTooLateToRefuse
                    await self._too_large(scope, receive, send, limit)
                    rejected = True
                    raise _BodyTooLarge
            return message

        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_seconds) as deadline:
                await self.app(scope, receive_counted, send_guarded)
        except TimeoutError:
            if not deadline.expired():
                raise  # a TimeoutError from inside the app (e.g. a connect timeout)
            await self._timed_out(scope, receive, send, started, response_started)
        except _BodyTooLarge:
            pass  # the 413 went out and was logged: it says it all
        except Exception:
            if not rejected:
                raise
            # The app failed because its body was cut short: the 413 says it all.

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        logger.info("http.error", code="payload_too_large", status_code=413, limit_bytes=limit)
        response = error_response(
            413,
            "payload_too_large",
            f"Request body exceeds the limit of {limit // MB} MB",
            details={"limit_bytes": limit},
        )
        await response(scope, receive, send)

    async def _timed_out(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        started: float,
        response_started: bool,
    ) -> None:
        elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
        logger.error(
            "http.request.timeout",
            method=scope.get("method"),
            path=scope.get("path"),
            timeout_seconds=self.timeout_seconds,
            duration_ms=elapsed_ms,
        )
        span = trace.get_current_span()
        span.set_status(Status(StatusCode.ERROR, "request timed out"))
        span.add_event("http.request.timeout", {"timeout_seconds": self.timeout_seconds})
        if response_started:
            # Headers are out; the only honest thing left is to cut the response short.
            raise RuntimeError("request timed out after the response had started")
        response = error_response(504, "gateway_timeout", "The request took too long")
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when absent, -1 when not a valid number."""
    value = Headers(scope=scope).get("content-length")
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isdigit() else -1
