"""CORS (pure ASGI): Starlette's CORSMiddleware, refusing preflights in the error envelope."""

from __future__ import annotations

import structlog
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from backend.errors import error_response

logger = structlog.get_logger(__name__)


class EnvelopeCORSMiddleware(CORSMiddleware):
    """Starlette's CORS layer; a refused preflight is a 400 `cors_refused` envelope.

    Starlette answers a preflight it refuses (origin, method, headers or private
    network not allowed) with the plain text "Disallowed CORS ...". Here the same
    400 carries the envelope, `details.refused` naming what was refused. Nothing
    about what *is* allowed is echoed: a refused preflight gets no CORS headers.
    """

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = (
            bytes(response.body).decode("latin-1").removeprefix("Disallowed CORS ").split(", ")
        )
        logger.info("http.error", code="cors_refused", status_code=400, refused=refused)
        return error_response(
            400, "cors_refused", "CORS preflight refused", details={"refused": refused}
        )
