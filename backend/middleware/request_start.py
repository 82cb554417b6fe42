"""The outermost layer: each request starts with clean contexts and its route looked up once.

Clean contexts: uvicorn creates the task of a pipelined request from inside the
task of the request before it, so that task inherits the previous request's
contextvars. The server-span layer would then take the previous span as the
parent and make the new request a child in the old trace, and log lines would
carry the old request id. Here both contexts start empty.

The route: the template (`/api/pipeline/runs/{run_id}`) is looked up here and
kept in the scope under `ROUTE_KEY`. The span name and `http.route`, the HTTP
metrics, the rate-limit rule, the log context and the access line all read
that one value, before the router itself dispatches.
"""

from __future__ import annotations

from functools import lru_cache

import structlog
from fastapi.routing import iter_route_contexts
from opentelemetry import context as otel_context
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

ROUTE_KEY = "loan_engine.route"
# Distinct (method, path) pairs remembered; paths with ids miss and are matched again.
CACHED_LOOKUPS = 2048


def route_of(scope: Scope) -> str | None:
    """The route template this request matched, if any (None: 404, or not resolved)."""
    route: str | None = scope.get(ROUTE_KEY)
    return route


class RouteTable:
    """The route templates of an application, flattened once for matching.

    FastAPI nests included routers; `iter_route_contexts` yields every route with
    its full template. The application is the one serving the request
    (`scope["app"]`, set before any middleware runs). The table is rebuilt when
    its route list changes length (routes are added before serving, in practice).
    """

    def __init__(self) -> None:
        self._size = -1
        self._routes: list[object] = []
        self._lookup = lru_cache(maxsize=CACHED_LOOKUPS)(self._match)

    def _match(self, kind: str, method: str, root_path: str, path: str) -> str | None:
        scope = {"type": kind, "method": method, "root_path": root_path, "path": path}
        partial: str | None = None
        for route in self._routes:
            match, _ = route.matches(scope)  # type: ignore[attr-defined]
            if match == Match.FULL:
                return getattr(route, "path_format", None)
            if match == Match.PARTIAL and partial is None:
                partial = getattr(route, "path_format", None)
        return partial

    def template(self, scope: Scope) -> str | None:
        """The template the router will pick for `scope` (None when nothing matches)."""
        routes = getattr(scope.get("app"), "routes", ())
        if len(routes) != self._size:
            self._routes = list(iter_route_contexts(routes))
            self._size = len(routes)
            self._lookup.cache_clear()
        return self._lookup(
            scope["type"], scope.get("method", ""), scope.get("root_path", ""), scope["path"]
        )


class RequestStartMiddleware:
    """Clears the trace and log contexts, and puts the route template in the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.routes = RouteTable()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        scope[ROUTE_KEY] = self.routes.template(scope)
        token = otel_context.attach(otel_context.Context())
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)
