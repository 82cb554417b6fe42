"""Request context: request id, log context, response headers and the one access line.

Pure ASGI, just inside the server span. Per HTTP request it:

- keeps a well-formed incoming `X-Request-ID` (1-128 of `[A-Za-z0-9._:-]`) or makes
  a UUID4, binds it with method, route, path and client_ip, and sets it on the span;
- notes the ALB `X-Amzn-Trace-Id` Root as `alb_trace_id`;
- in one pass over the response headers: `X-Request-ID`, `Server-Timing:
  total;dur=<ms>`, the security headers (when enabled) and, while the process
  drains, `Connection: close` (see `draining` below);
- renders the error envelope for an exception that escapes the layers inside
  before any response started (they normally render it themselves);
- writes exactly one `http.request.completed` line when the response has ended
  (error for 5xx, warning for 4xx, info otherwise; successful health probes and
  scrapes at debug), and a `http.request.slow` warning above SLOW_REQUEST_THRESHOLD_MS.

Draining: an idle keep-alive connection can only be closed without a race by
the client (a request sent as the server closes it is lost, and neither clients
nor the ALB retry it). So once `app.state.draining` is set (SIGTERM), every
response asks the client to leave, including those of requests that began before.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.config import Settings
from backend.errors import unhandled_exception_response
from backend.middleware.request_start import route_of
from backend.middleware.security_headers import REPLACED, SecurityHeaders
from backend.observability.access_log import AccessLog
from backend.observability.redaction import record_exception
from backend.observability.trace_ids import parse_amzn_trace_header

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Probes and scrapes arrive every few seconds: their successes are logged at debug.
HEALTH_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})
# Response headers this layer sets: any value from inside is replaced.
_OWN = frozenset({b"x-request-id", b"server-timing"})


def valid_request_id(value: str | None) -> bool:
    """Whether an incoming request id may be reused as is (no spaces, no newlines)."""
    return value is not None and _VALID_REQUEST_ID.fullmatch(value) is not None


class RequestContextMiddleware:
    """See the module docstring."""

    def __init__(
        self, app: ASGIApp, *, settings: Settings, security: SecurityHeaders | None
    ) -> None:
        self.app = app
        self.security = security
        self.slow_ms = settings.SLOW_REQUEST_THRESHOLD_MS
        self.access = AccessLog(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()
        headers = Headers(scope=scope)
        incoming = headers.get("x-request-id")
        request_id = incoming if incoming and valid_request_id(incoming) else str(uuid.uuid4())
        client = scope.get("client")
        context: dict[str, Any] = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "route": route_of(scope),
            "client_ip": client[0] if client else None,
        }
        alb_header = headers.get("x-amzn-trace-id")
        if alb_header:
            root = parse_amzn_trace_header(alb_header).get("Root")
            if root:
                context["alb_trace_id"] = root
        self.access.bind({key: value for key, value in context.items() if value is not None})

        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("request.id", request_id)
            if "alb_trace_id" in context:
                span.set_attribute("aws.alb.trace_id", context["alb_trace_id"])
        self.access.started(headers.get("user-agent"))

        status_code: int | None = None
        response_bytes = 0
        response_complete = False
        request_id_header = request_id.encode("latin-1")

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code, response_bytes, response_complete
            if message["type"] == "http.response.start":
                status_code = message["status"]
                elapsed_ms = (time.perf_counter() - start) * 1000
                message = {
                    **message,
                    "headers": self._response_headers(
                        scope, message.get("headers", ()), request_id_header, elapsed_ms
                    ),
                }
            elif message["type"] == "http.response.body":
                response_bytes += len(message.get("body", b""))
                if not message.get("more_body", False):
                    response_complete = True
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            error = exc
            if status_code is not None:
                if not response_complete:
                    raise  # mid-response: the server must cut the connection
            else:
                # A layer outside the error handler failed: the envelope, from here.
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                record_exception(span, exc)
                await unhandled_exception_response(exc)(scope, receive, send_wrapper)
        except BaseException as exc:  # cancellation: the client went away
            error = exc
            raise
        finally:
            self._finish(scope, start, status_code, response_bytes, error, headers)

    def _response_headers(
        self,
        scope: Scope,
        raw: Any,
        request_id: bytes,
        elapsed_ms: float,
    ) -> list[tuple[bytes, bytes]]:
        app = scope.get("app")
        draining = bool(getattr(getattr(app, "state", None), "draining", False))
        security = self.security
        headers: list[tuple[bytes, bytes]] = []
        html = cache_control = False
        for key, value in raw:
            name = key.lower()
            if name in _OWN or (security is not None and name in REPLACED):
                continue
            if draining and name == b"connection":
                continue
            if name == b"cache-control":
                cache_control = True
            elif name == b"content-type" and b"text/html" in value:
                html = True
            headers.append((key, value))
        headers.append((b"x-request-id", request_id))
        headers.append((b"server-timing", f"total;dur={elapsed_ms:.1f}".encode()))
        if security is not None:
            security.extend(headers, scope, html=html, cache_control=cache_control)
        if draining:
            headers.append((b"connection", b"close"))
        return headers

    def _finish(
        self,
        scope: Scope,
        start: float,
        status_code: int | None,
        response_bytes: int,
        error: BaseException | None,
        headers: Headers,
    ) -> None:
        duration_ms = round((time.perf_counter() - start) * 1000, 2)
        if status_code is None:
            # No response went out: the client left (cancellation, logged as nginx's 499)
            # or the application failed without answering (500).
            cancelled = error is not None and not isinstance(error, Exception)
            status_code = 499 if cancelled else 500
        path = scope.get("path", "")
        client = scope.get("client")
        fields: dict[str, Any] = {
            "method": scope.get("method"),
            "path": path,
            "status_code": status_code,
            "duration_ms": duration_ms,
            "client_ip": client[0] if client else None,
            "user_agent": headers.get("user-agent"),
            "response_bytes": response_bytes,
        }
        route = route_of(scope)
        if route is not None:
            fields["route"] = route
        if status_code >= 500:
            level = "error"
        elif status_code >= 400:
            level = "warning"
        elif path in HEALTH_PATHS:
            level = "debug"
        else:
            level = "info"
        self.access.completed(level, fields)
        if duration_ms > self.slow_ms:
            self.access.slow(
                method=fields["method"],
                path=path,
                route=route,
                status_code=status_code,
                duration_ms=duration_ms,
                threshold_ms=self.slow_ms,
            )
        # Servers run each request in its own task, but a caller running the app in its
        # own task (tests, embedded use) must not inherit this request's context.
        self.access.unbind()
