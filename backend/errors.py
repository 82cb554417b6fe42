"""Domain exceptions and the one error envelope every error response uses.

    {"error": {"code", "message", "request_id", "trace_id", "details"}}

Handlers never put exception text, SQL, stack traces or file paths in a
response: 5xx bodies carry a fixed message and the server logs the rest.
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from backend.observability.trace_ids import current_trace_id

logger = structlog.get_logger(__name__)

STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
    504: "gateway_timeout",
}


class ValidationIssue(BaseModel):
    """One rejected input of a 422: where it is, what is wrong, and the kind of error."""

    model_config = ConfigDict(extra="forbid")

    location: str = Field(examples=["body.sales_team_id"])
    message: str
    type: str


class ErrorBody(BaseModel):
    """The inside of every error response; `details` depends on `code`."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(examples=["validation_error"])
    message: str
    request_id: str | None
    trace_id: str | None
    details: list[ValidationIssue] | dict[str, Any] | None


class ErrorResponse(BaseModel):
    """The one error envelope (see `envelope`); documented for every error status."""

    model_config = ConfigDict(extra="forbid", title="ErrorResponse")

    error: ErrorBody


class AppError(Exception):
    """An error with a stable code and HTTP status, safe to show to a client."""

    status_code = 500
    code = "internal_error"
    message = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.message
        self.details = details
        self.headers = headers
        super().__init__(self.message)


class BadRequest(AppError):
    status_code, code, message = 400, "bad_request", "Bad request"


class Unauthorized(AppError):
    status_code, code, message = 401, "unauthorized", "Not authenticated"

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kwargs)


class Forbidden(AppError):
    status_code, code, message = 403, "forbidden", "Not allowed"


class NotFound(AppError):
    status_code, code, message = 404, "not_found", "Not found"


class Conflict(AppError):
    status_code, code, message = 409, "conflict", "Conflict"


class PayloadTooLarge(AppError):
    status_code, code, message = 413, "payload_too_large", "Request body too large"


class UnsupportedMediaType(AppError):
    status_code, code, message = 415, "unsupported_media_type", "Unsupported media type"


class ServiceUnavailable(AppError):
    status_code, code, message = 503, "service_unavailable", "Service temporarily unavailable"


class GatewayTimeout(AppError):
    status_code, code, message = 504, "gateway_timeout", "Request timed out"


def current_ids() -> tuple[str | None, str | None]:
    """The request id bound to the log context and the active trace id, if any."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return request_id, current_trace_id()


def envelope(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The error body for `code`, stamped with the current request and trace ids."""
    request_id, trace_id = current_ids()
    return {
        "error": {
            "code": code,
            "message": message,
            "request_id": request_id,
            "trace_id": trace_id,
            "details": details,
        }
    }


def error_response(
    status_code: int,
    code: str | None = None,
    message: str | None = None,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    code = code or STATUS_CODES.get(status_code, "error")
    message = message or code.replace("_", " ").capitalize()
    return JSONResponse(envelope(code, message, details), status_code=status_code, headers=headers)


def _validation_details(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Only where, what and which kind: the rejected value itself is never echoed back.
    return [
        {
            "location": ".".join(str(part) for part in err.get("loc", ())),
            "message": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors()
    ]


def log_error(status_code: int, code: str, exc: BaseException | None = None) -> None:
    """The logging policy: 4xx at info without traceback, 5xx at error with it."""
    if status_code >= 500:
        logger.error("http.error", code=code, status_code=status_code, exc_info=exc)
    else:
        logger.info("http.error", code=code, status_code=status_code)


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    log_error(exc.status_code, exc.code, exc)
    return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)


def allowed_methods(request: Request) -> str:
    """Every method some route serves on this request's path, for a 405's `Allow`.

    The router names only the first route whose path matched; a path served by
    several routes (GET and DELETE /api/files) must list them all.
    """
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= route.methods or set()
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = STATUS_CODES.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else None
    # Starlette's own 5xx details could describe internals; only 4xx text goes out.
    message = (detail if exc.status_code < 500 else None) or code.replace("_", " ").capitalize()
    log_error(exc.status_code, code, exc)
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
    return error_response(exc.status_code, code, message, headers=headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = _validation_details(exc)
    logger.info("http.error", code="validation_error", status_code=422, errors=len(details))
    return error_response(422, "validation_error", "Request validation failed", details)


async def _integrity_error(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("db.integrity_error", error_type=type(exc).__name__)
    return error_response(409, "conflict", "The request conflicts with existing data")


async def _data_error(request: Request, exc: Exception) -> JSONResponse:
    # Schemas bound every input to its column; this is the net for one that slipped
    # through: PostgreSQL refused a value (SQLSTATE class 22), which is the request's
    # data, not an outage. Logged so the missing bound gets added.
    logger.warning("db.data_error", error_type=type(exc).__name__)
    return error_response(422, "validation_error", "A value in the request cannot be stored")


# Seconds a client is asked to wait before retrying when the database is unavailable.
DATABASE_RETRY_AFTER = "5"


def is_database_unavailable(exc: BaseException) -> bool:
    """True when `exc` means the database cannot be reached or no connection is free.

    Covers the pool timeout, asyncpg failing to connect (it raises OSError and
    TimeoutError, which is an OSError, before SQLAlchemy can wrap anything),
    connections lost mid-statement and PostgreSQL refusing work (OperationalError).
    """
    if isinstance(exc, PoolTimeoutError | OperationalError | InterfaceError | OSError):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def unhandled_exception_response(exc: BaseException) -> JSONResponse:
    """The envelope for an exception no specific handler claimed: 503 or 500.

    The exception and its traceback are logged; the client sees a fixed message.
    """
    if is_database_unavailable(exc):
        logger.error("db.unavailable", error_type=type(exc).__name__, status_code=503, exc_info=exc)
        return error_response(
            503,
            "service_unavailable",
            "Service temporarily unavailable; please retry",
            headers={"Retry-After": DATABASE_RETRY_AFTER},
        )
    logger.error("http.unhandled_exception", error_type=type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", "Internal server error")


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return unhandled_exception_response(exc)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    return unhandled_exception_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error, whatever raised it, into the envelope."""
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(DataError, _data_error)
    # Database unreachable or pool exhausted: 503, never a 500 or a hang.
    for exc_type in (PoolTimeoutError, OperationalError, InterfaceError, DBAPIError, OSError):
        app.add_exception_handler(exc_type, _database_unavailable)
    app.add_exception_handler(Exception, _unhandled)
