"""/api/auth: register, login, me."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, status
from fastapi.security import OAuth2PasswordRequestForm

from backend.api.dependencies import CurrentUser, SessionDep, SettingsDep
from backend.auth import service
from backend.auth.schemas import RegisterRequest, RegistrationAccepted, TokenResponse, UserRead
from backend.auth.security import create_access_token
from backend.errors import Forbidden

logger = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/auth", tags=["auth"])


class RegistrationClosed(Forbidden):
    code, message = "registration_closed", "Self-registration is disabled; ask an admin"


@router.post(
    "/register",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RegistrationAccepted,
    responses={403: {"description": "Self-registration is disabled (ALLOW_REGISTRATION)"}},
)
async def register(
    data: RegisterRequest, session: SessionDep, settings: SettingsDep
) -> RegistrationAccepted:
    """Create a viewer account. A taken username or email gets the same 202 and body as
    a new account (and takes as long), so the endpoint never tells which names exist."""
    if not settings.ALLOW_REGISTRATION:
        raise RegistrationClosed()
    user = await service.register(session, settings, data)
    logger.info("user.registered" if user else "user.registration_ignored")
    return RegistrationAccepted()


@router.post(
    "/login",
    response_model=TokenResponse,
    responses={401: {"description": "Wrong credentials or an inactive account (always the same)"}},
)
async def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    session: SessionDep,
    settings: SettingsDep,
) -> TokenResponse:
    user = await service.authenticate(session, settings, form.username, form.password)
    token, expires_in = create_access_token(settings, str(user.id), user.role.value)
    return TokenResponse(access_token=token, expires_in=expires_in)


@router.get("/me", response_model=UserRead)
async def me(user: CurrentUser) -> UserRead:
    return UserRead.model_validate(user)
