"""/api/users: admin-only listing and updates."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from backend.api.dependencies import AdminUser, SessionDep
from backend.auth.schemas import UserRead
from backend.models import INT4_MAX
from backend.pagination import Page, PageDep
from backend.users import service
from backend.users.schemas import UserUpdate

router = APIRouter(prefix="/api/users", tags=["users"])


@router.get("", response_model=Page[UserRead])
async def list_users(_admin: AdminUser, session: SessionDep, page: PageDep) -> Page[UserRead]:
    users, total = await service.list_users(session, page)
    return Page(
        items=[UserRead.model_validate(u) for u in users],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.patch(
    "/{user_id}",
    response_model=UserRead,
    responses={
        400: {"description": "No sales team has this sales_team_id"},
        404: {"description": "No such user"},
        409: {"description": "An admin may not demote or deactivate themselves"},
    },
)
async def update_user(
    user_id: Annotated[int, Path(ge=1, le=INT4_MAX)],
    changes: UserUpdate,
    admin: AdminUser,
    session: SessionDep,
) -> UserRead:
    user = await service.update_user(session, admin, user_id, changes)
    return UserRead.model_validate(user)
