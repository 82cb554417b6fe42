"""Security response headers on every HTTP response (pure ASGI)."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.middleware.client_ip import TrustedProxies, is_https

# HTML the service itself serves (a built frontend) loads only its own assets.
STRICT_HTML_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# Swagger UI and ReDoc pull their bundles from a CDN and boot with an inline script.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly "
    "https://validator.swagger.io; "
    "font-src 'self' https://fonts.gstatic.com; worker-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'"
)
# JSON is never a document; nothing in it may load or frame anything.
API_CSP = "default-src 'none'; frame-ancestors 'none'"
HSTS = "max-age=63072000; includeSubDomains"
DOCS_PREFIXES = ("/docs", "/redoc")

COMMON_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "strict-origin-when-cross-origin"),
    (
        "Permissions-Policy",
        "camera=(), microphone=(), geolocation=(), payment=(), usb=(), interest-cohort=()",
    ),
    ("Cross-Origin-Opener-Policy", "same-origin"),
)


class SecurityHeadersMiddleware:
    """Adds the OWASP response headers and removes `Server`.

    Contract: every HTTP response leaving this layer carries nosniff,
    X-Frame-Options DENY, Referrer-Policy, Permissions-Policy and a CSP (strict
    on HTML, relaxed only under /docs and /redoc, `default-src 'none'` on
    everything else); `Cache-Control: no-store` unless the app chose a policy;
    HSTS in production when the client connected over HTTPS.
    """

    def __init__(self, app: ASGIApp, *, trusted_proxies: TrustedProxies, production: bool) -> None:
        self.app = app
        self.trusted_proxies = trusted_proxies
        self.production = production

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        path: str = scope.get("path", "")
        hsts = self.production and is_https(scope, self.trusted_proxies)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in COMMON_HEADERS:
                    headers[name] = value
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
                if "text/html" in headers.get("content-type", ""):
                    docs = path.startswith(DOCS_PREFIXES)
                    headers["Content-Security-Policy"] = DOCS_CSP if docs else STRICT_HTML_CSP
                else:
                    headers["Content-Security-Policy"] = API_CSP
                if hsts:
                    headers["Strict-Transport-Security"] = HSTS
                # The server name and version help nobody but an attacker.
                del headers["server"]
            await send(message)

        await self.app(scope, receive, send_with_headers)
