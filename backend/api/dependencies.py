"""Dependencies, declared once as `Annotated` aliases and used by every route."""

from __future__ import annotations

import email.message
from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import Depends, Request, params
from fastapi.routing import APIRoute
from fastapi.security import OAuth2PasswordBearer
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.security import InvalidToken, decode_access_token
from backend.config import Settings
from backend.database import Database
from backend.errors import Forbidden, Unauthorized, UnsupportedMediaType
from backend.models import INT4_MAX, Role, User
from backend.pipeline.dispatch import RunDispatcher
from backend.storage import Storage

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/auth/login", auto_error=False)


def takes_json_body(route: APIRoute) -> bool:
    """Whether `route` declares a body FastAPI reads as JSON (not a form or upload)."""
    field = route.body_field
    return field is not None and not isinstance(field.field_info, params.Form)


def is_json_media_type(content_type: str) -> bool:
    """`application/json` or `application/*+json`, parameters ignored (FastAPI's rule)."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def require_json_body(request: Request) -> None:
    """App-wide dependency: 415 when a route that takes a JSON body is sent another type.

    `async` although it never awaits: FastAPI runs a plain `def` dependency in a thread,
    a hop every request would pay for a check of a few microseconds.

    FastAPI would hand the raw bytes to validation and answer a misleading 422. A
    request without Content-Type is read as JSON, as FastAPI does; routes without a
    JSON body (forms, uploads, no body) are untouched.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not takes_json_body(route):
        return
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json_media_type(content_type):
        raise UnsupportedMediaType("The request body must be JSON (Content-Type: application/json)")


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_database(request: Request) -> Database:
    database: Database = request.app.state.db
    return database


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_runner(request: Request) -> RunDispatcher:
    runner: RunDispatcher = request.app.state.runner
    return runner


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
StorageDep = Annotated[Storage, Depends(get_storage)]
RunnerDep = Annotated[RunDispatcher, Depends(get_runner)]


async def get_session(database: DatabaseDep) -> AsyncIterator[AsyncSession]:
    """One session per request, committed before the response is sent; 503 at once
    while the database breaker is open."""
    async with database.request_session() as session:
        yield session


# scope="function": commit (or roll back) before the response goes out, so a failed
# commit becomes an error response rather than a success that was never stored.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def user_id_from_subject(subject: str) -> int | None:
    """The user id a token's `sub` names, or None when it cannot be one.

    Only plain ASCII digits within the id column's range: a validly signed token
    must still never send an out-of-range number to the database.
    """
    if not (subject.isascii() and subject.isdigit()) or len(subject) > len(str(INT4_MAX)):
        return None
    user_id = int(subject)
    return user_id if 1 <= user_id <= INT4_MAX else None


async def get_current_user(
    session: SessionDep,
    settings: SettingsDep,
    token: Annotated[str | None, Depends(oauth2_scheme)],
) -> User:
    """The active user named by a verified bearer token."""
    if not token:
        raise Unauthorized("Not authenticated")
    try:
        claims = decode_access_token(settings, token)
    except InvalidToken:
        raise Unauthorized("Could not validate credentials") from None
    user_id = user_id_from_subject(claims["sub"])
    if user_id is None:
        raise Unauthorized("Could not validate credentials")
    user = await session.get(User, user_id)
    if user is None or not user.is_active:
        raise Unauthorized("Could not validate credentials")
    # Only now that the token is verified does the user enter logs and the trace.
    structlog.contextvars.bind_contextvars(user=user.username, user_id=user.id)
    trace.get_current_span().set_attribute("enduser.id", str(user.id))
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


class RoleChecker:
    """Dependency: the current user, when their role is one of `roles`; else 403.

    A class rather than a closure so the OpenAPI contract can tell which routes may
    answer 403 (see backend/api/openapi.py).
    """

    def __init__(self, *roles: Role) -> None:
        self.roles = frozenset(roles)

    async def __call__(self, user: CurrentUser) -> User:
        if user.role not in self.roles:
            raise Forbidden("Your role does not allow this action")
        return user


def require_roles(*roles: Role) -> object:
    return Depends(RoleChecker(*roles))


AdminUser = Annotated[User, require_roles(Role.ADMIN)]
AnalystUser = Annotated[User, require_roles(Role.ADMIN, Role.ANALYST)]
