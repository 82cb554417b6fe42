"""/api/teams: sales teams, admin only. Users join or leave a team through
PATCH /api/users/{id} (`sales_team_id`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from backend.api.dependencies import AdminUser, SessionDep
from backend.models import INT4_MAX, SalesTeam
from backend.pagination import Page, PageDep
from backend.teams import service
from backend.teams.schemas import TeamCreate, TeamRead, TeamUpdate

router = APIRouter(prefix="/api/teams", tags=["teams"])

TeamId = Annotated[int, Path(ge=1, le=INT4_MAX)]


def _read(team: SalesTeam, member_count: int) -> TeamRead:
    return TeamRead(
        id=team.id,
        name=team.name,
        region=team.region,
        created_at=team.created_at,
        member_count=member_count,
    )


@router.get("", response_model=Page[TeamRead])
async def list_teams(_admin: AdminUser, session: SessionDep, page: PageDep) -> Page[TeamRead]:
    teams, total = await service.list_teams(session, page)
    return Page(
        items=[_read(team, count) for team, count in teams],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TeamRead,
    responses={409: {"description": "A team with this name exists"}},
)
async def create_team(body: TeamCreate, _admin: AdminUser, session: SessionDep) -> TeamRead:
    team = await service.create_team(session, body.name, body.region)
    return _read(team, 0)


@router.get("/{team_id}", response_model=TeamRead, responses={404: {"description": "No such team"}})
async def get_team(team_id: TeamId, _admin: AdminUser, session: SessionDep) -> TeamRead:
    team = await service.get_team(session, team_id)
    return _read(team, await service.member_count(session, team.id))


@router.patch(
    "/{team_id}",
    response_model=TeamRead,
    responses={
        404: {"description": "No such team"},
        409: {"description": "Another team has this name"},
    },
)
async def update_team(
    team_id: TeamId, changes: TeamUpdate, _admin: AdminUser, session: SessionDep
) -> TeamRead:
    team = await service.update_team(session, team_id, changes.model_dump(exclude_unset=True))
    return _read(team, await service.member_count(session, team.id))
