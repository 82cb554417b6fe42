"""Dependencies, declared once as `Annotated` aliases and used by every route."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.security import InvalidToken, decode_access_token
from backend.config import Settings
from backend.database import Database
from backend.errors import Forbidden, Unauthorized
from backend.models import Role, User
from backend.pipeline.runner import PipelineRunner
from backend.storage import Storage

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/auth/login", auto_error=False)


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_database(request: Request) -> Database:
    database: Database = request.app.state.db
    return database


def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


def get_runner(request: Request) -> PipelineRunner:
    runner: PipelineRunner = request.app.state.runner
    return runner


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
StorageDep = Annotated[Storage, Depends(get_storage)]
RunnerDep = Annotated[PipelineRunner, Depends(get_runner)]


async def get_session(database: DatabaseDep) -> AsyncIterator[AsyncSession]:
    """One session per request, committed before the response is sent."""
    async with database.session() as session:
        yield session


# scope="function": commit (or roll back) before the response goes out, so a failed
# commit becomes an error response rather than a success that was never stored.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


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
        user_id = int(claims["sub"])
    except (InvalidToken, ValueError):
        raise Unauthorized("Could not validate credentials") from None
    user = await session.get(User, user_id)
    if user is None or not user.is_active:
        raise Unauthorized("Could not validate credentials")
    # Only now that the token is verified does the user enter logs and the trace.
    structlog.contextvars.bind_contextvars(user=user.username, user_id=user.id)
    trace.get_current_span().set_attribute("enduser.id", str(user.id))
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def require_roles(*roles: Role) -> object:
    allowed = frozenset(roles)

    async def checker(user: CurrentUser) -> User:
        if user.role not in allowed:
            raise Forbidden("Your role does not allow this action")
        return user

    return Depends(checker)


AdminUser = Annotated[User, require_roles(Role.ADMIN)]
AnalystUser = Annotated[User, require_roles(Role.ADMIN, Role.ANALYST)]
