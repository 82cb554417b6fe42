"""Request context: request id, log context, Server-Timing and the one access line.

Pure ASGI. It sits just inside the OpenTelemetry server span and outside
Starlette's ServerErrorMiddleware, so it also sees (and stamps) the final 500
rendered by the catch-all exception handler. Per HTTP request it:

- clears the structlog contextvars (a context must never leak between requests),
- keeps a well-formed incoming `X-Request-ID` (1-128 of `[A-Za-z0-9._:-]`) or makes
  a UUID4, binds it with method, route, path and client_ip, and sets it on the span,
- notes the ALB `X-Amzn-Trace-Id` Root as `alb_trace_id`,
- adds `X-Request-ID` and `Server-Timing: total;dur=<ms>` to every response,
- writes exactly one `http.request.completed` line when the response has ended
  (error for 5xx, warning for 4xx, info otherwise; successful health probes at
  debug), and a `http.request.slow` warning above SLOW_REQUEST_THRESHOLD_MS.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from starlette.applications import Starlette
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.config import Settings
from backend.observability.metrics import MetricsCollector
from backend.observability.tracing import ALB_TRACE_HEADER, parse_amzn_trace_header

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Probes that would otherwise fill the logs at info with one line every few seconds.
HEALTH_PATHS = frozenset({"/health", "/health/live", "/health/ready"})


def valid_request_id(value: str | None) -> bool:
    """Whether an incoming request id may be reused as is (no spaces, no newlines)."""
    return value is not None and _VALID_REQUEST_ID.fullmatch(value) is not None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _route_template(router: Router | None, scope: Scope) -> str | None:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if router is None:
        return None
    # Before routing has run: find the template the router will pick.
    partial: str | None = None
    for candidate in router.routes:
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "")) or None
        if match == Match.PARTIAL and partial is None:
            partial = getattr(candidate, "path", None)
    return partial


class RequestContextMiddleware:
    """See the module docstring. `router` lets the route template be bound up front."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        router: Router | None = None,
        metrics: MetricsCollector | None = None,
    ) -> None:
        self.app = app
        self.router = router
        self.metrics = metrics
        self.slow_ms = settings.SLOW_REQUEST_THRESHOLD_MS
        # Per application, so a test app configured at DEBUG gets a DEBUG logger.
        self.logger = structlog.get_logger("backend.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and valid_request_id(incoming) else str(uuid.uuid4())
        client = scope.get("client")
        context: dict[str, Any] = {
            "request_id": request_id,
            "method": scope.get("method"),
            "path": scope.get("path"),
            "route": _route_template(self.router, scope),
            "client_ip": client[0] if client else None,
        }
        alb_header = _header(scope, ALB_TRACE_HEADER.encode())
        if alb_header:
            root = parse_amzn_trace_header(alb_header).get("Root")
            if root:
                context["alb_trace_id"] = root
        structlog.contextvars.bind_contextvars(
            **{key: value for key, value in context.items() if value is not None}
        )

        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("request.id", request_id)
            if "alb_trace_id" in context:
                span.set_attribute("aws.alb.trace_id", context["alb_trace_id"])
        self.logger.debug("http.request.started", user_agent=_header(scope, b"user-agent"))

        status_code: int | None = None
        response_bytes = 0
        response_complete = False
        request_id_header = request_id.encode("latin-1")

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code, response_bytes, response_complete
            if message["type"] == "http.response.start":
                status_code = message["status"]
                elapsed_ms = (time.perf_counter() - start) * 1000
                headers = [
                    (key, value)
                    for key, value in message.get("headers", ())
                    if key.lower() not in (b"x-request-id", b"server-timing")
                ]
                headers.append((b"x-request-id", request_id_header))
                headers.append((b"server-timing", f"total;dur={elapsed_ms:.1f}".encode()))
                message = {**message, "headers": headers}
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
            # Starlette's ServerErrorMiddleware has already rendered the 500 through the
            # catch-all handler (which logged the exception with the request's ids and
            # recorded it on the span) and re-raises only so that a server can log it.
            # Re-raising would print the same traceback a second time, unstructured.
            if not response_complete:
                raise
        except BaseException as exc:  # cancellation: the client went away
            error = exc
            raise
        finally:
            self._access_line(scope, start, status_code, response_bytes, error)
            # Servers run each request in its own task, but a caller running the app in
            # its own task (tests, embedded use) must not inherit this request's context.
            structlog.contextvars.clear_contextvars()

    def _access_line(
        self,
        scope: Scope,
        start: float,
        status_code: int | None,
        response_bytes: int,
        error: BaseException | None,
    ) -> None:
        duration_ms = round((time.perf_counter() - start) * 1000, 2)
        if status_code is None:
            # No response went out: the client left (cancellation, logged as nginx's 499)
            # or the application failed without answering (500).
            cancelled = error is not None and not isinstance(error, Exception)
            status_code = 499 if cancelled else 500
        path = scope.get("path", "")
        route = _route_template(None, scope)
        client = scope.get("client")
        fields: dict[str, Any] = {
            "method": scope.get("method"),
            "path": path,
            "status_code": status_code,
            "duration_ms": duration_ms,
            "client_ip": client[0] if client else None,
            "user_agent": _header(scope, b"user-agent"),
            "response_bytes": response_bytes,
        }
        if route is not None:
            fields["route"] = route
        if status_code >= 500:
            self.logger.error("http.request.completed", **fields)
        elif status_code >= 400:
            self.logger.warning("http.request.completed", **fields)
        elif path in HEALTH_PATHS:
            self.logger.debug("http.request.completed", **fields)
        else:
            self.logger.info("http.request.completed", **fields)
        if self.metrics is not None and path not in HEALTH_PATHS:
            # Probes every few seconds would drown the latency figures of real traffic.
            self.metrics.record_request(
                str(fields["method"]), route or "unmatched", status_code, duration_ms
            )
        if duration_ms > self.slow_ms:
            self.logger.warning(
                "http.request.slow",
                method=fields["method"],
                path=path,
                route=route,
                status_code=status_code,
                duration_ms=duration_ms,
                threshold_ms=self.slow_ms,
            )


class FreshContextMiddleware:
    """Outermost layer: every request starts with no trace context and no log context.

    uvicorn creates the task of a pipelined request from inside the task of the
    request before it, so that task inherits the previous request's contextvars.
    The OTel middleware would then see the previous server span as current and
    make the new request an INTERNAL child in the old trace instead of a new trace.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        token = otel_context.attach(otel_context.Context())
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)


def install_request_context(app: Starlette, settings: Settings) -> None:
    """Put `RequestContextMiddleware` right inside the OTel server span of `app`.

    Middleware added with `app.add_middleware` runs inside Starlette's
    ServerErrorMiddleware, which renders the final 500 with the outer `send`;
    from there the request id and Server-Timing could not reach that response.
    The FastAPI instrumentation builds `OTel(ServerErrorMiddleware(...))`, so the
    request context goes between the two. `FreshContextMiddleware` wraps it all.
    Call after instrumenting `app`.
    """
    build_stack = app.build_middleware_stack
    metrics: MetricsCollector | None = getattr(app.state, "metrics", None)

    def build_middleware_stack() -> ASGIApp:
        stack = build_stack()
        node: Any = stack
        while node is not None and not isinstance(node, OpenTelemetryMiddleware):
            node = getattr(node, "app", None)
        if node is None:  # not instrumented: the request context is outermost
            return FreshContextMiddleware(
                RequestContextMiddleware(stack, settings, app.router, metrics)
            )
        node.app = RequestContextMiddleware(node.app, settings, app.router, metrics)
        return FreshContextMiddleware(stack)

    app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]
