"""Answer only for the host names in TRUSTED_HOSTS (pure ASGI).

Like Starlette's TrustedHostMiddleware, but a refused request gets the error
envelope (400 bad_request) instead of a plain-text body, and the health probes
answer whatever the Host: the ALB's target-group checks send the target's IP
(`10.0.1.23:8000`) and ECS container checks send `localhost`, neither of which
is a public name. Every other path keeps the check.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.errors import error_response

logger = structlog.get_logger(__name__)

# Exact paths: the probes carry no data and no session, so any Host may ask.
PROBE_PATHS = frozenset({"/health", "/health/live", "/health/ready"})


class TrustedHostMiddleware:
    """Rejects requests whose Host header is not an allowed name.

    `allowed_hosts` entries are exact names or `*.example.com` wildcards; `*`
    alone allows every host (then this layer passes everything through).
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed = [host.strip().lower() for host in allowed_hosts if host.strip()]
        self.allow_any = "*" in self.allowed

    def is_allowed(self, host: str) -> bool:
        for pattern in self.allowed:
            if host == pattern or (
                pattern.startswith("*.") and host.endswith(pattern[1:]) and host != pattern[2:]
            ):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allow_any or scope["type"] != "http" or scope.get("path") in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        raw = Headers(scope=scope).get("host", "")
        # Strip the port; a bracketed IPv6 literal keeps its colons.
        host = raw.rsplit(":", 1)[0] if raw.count(":") == 1 else raw
        if self.is_allowed(host.strip().lower()):
            await self.app(scope, receive, send)
            return
        logger.warning("http.host_rejected", host=raw[:255])
        response = error_response(400, "bad_request", "Invalid host header")
        await response(scope, receive, send)
