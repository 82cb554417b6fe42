"""/api/auth: register, login, me."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status
from fastapi.security import OAuth2PasswordRequestForm

from backend.api.dependencies import CurrentUser, SessionDep, SettingsDep
from backend.auth import service
from backend.auth.schemas import RegisterRequest, TokenResponse, UserRead
from backend.auth.security import create_access_token

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post("/register", status_code=status.HTTP_201_CREATED, response_model=UserRead)
async def register(data: RegisterRequest, session: SessionDep, settings: SettingsDep) -> UserRead:
    user = await service.register(session, settings, data)
    return UserRead.model_validate(user)


@router.post("/login", response_model=TokenResponse)
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
