"""Security response headers on every HTTP response (added in the request context's
one pass over the response headers)."""

from __future__ import annotations

from starlette.types import Scope

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


# Names this layer sets (lower-case): a value the app set for one of them is replaced.
REPLACED = frozenset(
    {name.lower().encode() for name, _ in COMMON_HEADERS} | {b"content-security-policy", b"server"}
)
_COMMON_RAW = tuple((name.lower().encode(), value.encode()) for name, value in COMMON_HEADERS)
_CSP = b"content-security-policy"
_NO_STORE = (b"cache-control", b"no-store")
_API_CSP = (_CSP, API_CSP.encode())
_DOCS_CSP = (_CSP, DOCS_CSP.encode())
_HTML_CSP = (_CSP, STRICT_HTML_CSP.encode())
_HSTS = (b"strict-transport-security", HSTS.encode())


class SecurityHeaders:
    """The OWASP response headers, for the response-header pass of the request context.

    Contract: every HTTP response carries nosniff, X-Frame-Options DENY,
    Referrer-Policy, Permissions-Policy and a CSP (strict on HTML, relaxed only
    under /docs and /redoc, `default-src 'none'` on everything else);
    `Cache-Control: no-store` unless the app chose a policy; HSTS in production
    when the client connected over HTTPS; no `Server` header.
    """

    def __init__(self, *, trusted_proxies: TrustedProxies, production: bool) -> None:
        self.trusted_proxies = trusted_proxies
        self.production = production

    def extend(
        self,
        headers: list[tuple[bytes, bytes]],
        scope: Scope,
        *,
        html: bool,
        cache_control: bool,
    ) -> None:
        """Append the headers to `headers`, from which the REPLACED names were left out."""
        headers.extend(_COMMON_RAW)
        if not cache_control:
            headers.append(_NO_STORE)
        if html:
            headers.append(
                _DOCS_CSP if scope.get("path", "").startswith(DOCS_PREFIXES) else _HTML_CSP
            )
        else:
            headers.append(_API_CSP)
        if self.production and is_https(scope, self.trusted_proxies):
            headers.append(_HSTS)
