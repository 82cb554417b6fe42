"""The OpenAPI contract: every error status a route can answer, each in the one envelope.

Routes declare only their own domain outcomes (`responses={404: {"description": ...}}`);
what every route shares is derived here, once, from the route and the layers
around the router:

- any route: 400 (a Host outside TRUSTED_HOSTS, control characters in the URL, a
  malformed Content-Length), 500 and 504 (REQUEST_TIMEOUT_SECONDS);
- a route that takes parameters or a body: 422; with a body also 413; with a JSON
  body also 415 (another Content-Type, see `require_json_body`);
- a signed-in route (it has a security requirement): 401; a role-restricted one: 403;
- a route that opens a database session: 503 when the database is unavailable;
- a route under /api/: 429 from the rate limiter, and 503 when its store is down
  with RATE_LIMIT_FAIL_OPEN=false.

Every 4xx and 5xx response is then documented as `ErrorResponse` (see
backend/errors.py), FastAPI's `HTTPValidationError` included: the service never
answers `{"detail": ...}`. A response a route documents with a model of its own
(readiness's 503) keeps it. HEAD operations document no body.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from starlette.routing import BaseRoute

from backend.api.dependencies import RoleChecker, get_database, get_session
from backend.errors import ErrorResponse

ERROR_SCHEMA = "ErrorResponse"
_ERROR_REF = f"#/components/schemas/{ERROR_SCHEMA}"
# What FastAPI documents for a 422 on its own; replaced, and dropped when unused.
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")

EVERY_ROUTE = {
    400: "Malformed request (host not allowed, control characters in the URL, bad Content-Length)",
    500: "Internal error (the message is fixed; the server logs the rest)",
    504: "The request ran longer than REQUEST_TIMEOUT_SECONDS",
}
WITH_INPUT = {422: "A parameter or the body failed validation (`details` lists each problem)"}
WITH_BODY = {413: "The request body is larger than allowed"}
WITH_JSON_BODY = {415: "The body is not JSON (Content-Type must be application/json)"}
SIGNED_IN = {401: "Missing, invalid or expired bearer token (`WWW-Authenticate: Bearer`)"}
ROLE_RESTRICTED = {403: "The signed-in user's role does not allow this"}
USES_DATABASE = {503: "The database is unavailable (`Retry-After` says when to retry)"}
RATE_LIMITED = {
    429: "Rate limit exceeded (`Retry-After` and `RateLimit` headers say when to retry)",
    503: "The database or the rate-limit store is unavailable (`Retry-After`)",
}


def _dependency_calls(dependant: Dependant) -> Iterator[object]:
    for dependency in dependant.dependencies:
        yield dependency.call
        yield from _dependency_calls(dependency)


def error_statuses(route: RouteContext, operation: dict[str, Any]) -> dict[int, str]:
    """The error statuses `route` can answer beyond its own, with a description of each."""
    calls = list(_dependency_calls(route.dependant))
    statuses = dict(EVERY_ROUTE)
    if operation.get("parameters") or "requestBody" in operation:
        statuses |= WITH_INPUT
    if "requestBody" in operation:
        statuses |= WITH_BODY
        if "application/json" in operation["requestBody"].get("content", {}):
            statuses |= WITH_JSON_BODY
    if operation.get("security"):
        statuses |= SIGNED_IN
    if any(isinstance(call, RoleChecker) for call in calls):
        statuses |= ROLE_RESTRICTED
    if get_session in calls or get_database in calls:
        statuses |= USES_DATABASE
    if str(route.path_format).startswith("/api/"):
        statuses |= RATE_LIMITED
    return statuses


def _is_own_model(response: dict[str, Any]) -> bool:
    """Whether the route documented this response with a model of its own."""
    ref = response.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
    return isinstance(ref, str) and ref.rsplit("/", 1)[-1] not in _FASTAPI_VALIDATION_SCHEMAS


def _document_errors(operation: dict[str, Any], statuses: dict[int, str]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for code, description in statuses.items():
        responses.setdefault(str(code), {"description": description})
    for key, response in responses.items():
        if int(key) >= 400 and not _is_own_model(response):
            if response.get("description") == "Validation Error":  # FastAPI's own 422
                response["description"] = statuses.get(int(key), response["description"])
            response["content"] = {"application/json": {"schema": {"$ref": _ERROR_REF}}}
    operation["responses"] = dict(sorted(responses.items()))


def _error_component() -> dict[str, dict[str, Any]]:
    """ErrorResponse and the models it refers to, as component schemas."""
    schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, dict[str, Any]] = schema.pop("$defs", {})
    components[ERROR_SCHEMA] = schema
    return components


def with_error_responses(document: dict[str, Any], routes: list[BaseRoute]) -> dict[str, Any]:
    """`document` (FastAPI's OpenAPI) with the error contract applied to every operation."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_error_component())
    # Route contexts: included routers as the app serves them (prefix, dependencies).
    for route in iter_route_contexts(routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        path_item = document["paths"].get(route.path_format, {})
        for method in route.methods or ():
            operation = path_item.get(method.lower())
            if operation is None:
                continue
            _document_errors(operation, error_statuses(route, operation))
            if method == "HEAD":
                for response in operation["responses"].values():
                    response.pop("content", None)
    # Every 422 now refers to ErrorResponse: FastAPI's validation schemas are unused.
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)
    return document


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json, /docs) serve the contract, built once."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_error_responses(build(), app.routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
