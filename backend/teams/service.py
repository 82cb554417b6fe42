"""Sales teams: creating, renaming, listing, and putting users in them (all SQL of
the teams domain). A user's team decides which tapes and runs they read
(backend/scoping.py)."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.errors import Conflict, NotFound
from backend.models import INT4_MAX, SalesTeam, User
from backend.pagination import PageParams

logger = structlog.get_logger(__name__)


class TeamNotFound(NotFound):
    code, message = "team_not_found", "Sales team not found"


class TeamNameTaken(Conflict):
    code, message = "team_name_taken", "A sales team with this name already exists"


class UserNotFound(NotFound):
    code, message = "user_not_found", "User not found"


async def member_count(session: AsyncSession, team_id: int) -> int:
    """How many users are in team `team_id`."""
    count = await session.scalar(
        select(func.count()).select_from(User).where(User.sales_team_id == team_id)
    )
    return count or 0


async def list_teams(
    session: AsyncSession, page: PageParams | None = None
) -> tuple[list[tuple[SalesTeam, int]], int]:
    """Teams by id with their member counts (one page, or all), and how many teams exist."""
    total = await session.scalar(select(func.count()).select_from(SalesTeam)) or 0
    members = (
        select(User.sales_team_id, func.count().label("n"))
        .where(User.sales_team_id.is_not(None))
        .group_by(User.sales_team_id)
        .subquery()
    )
    query = (
        select(SalesTeam, func.coalesce(members.c.n, 0))
        .outerjoin(members, members.c.sales_team_id == SalesTeam.id)
        .order_by(SalesTeam.id)
    )
    if page is not None:
        query = query.limit(page.limit).offset(page.offset)
    rows = (await session.execute(query)).all()
    return [(team, int(count)) for team, count in rows], total


async def get_team(session: AsyncSession, team_id: int) -> SalesTeam:
    team = await session.get(SalesTeam, team_id)
    if team is None:
        raise TeamNotFound()
    return team


async def find_team(session: AsyncSession, ref: str) -> SalesTeam:
    """The team named `ref` exactly or, failing that, whose id `ref` is; TeamNotFound."""
    team = await session.scalar(select(SalesTeam).where(SalesTeam.name == ref))
    if team is None and ref.isascii() and ref.isdigit() and 1 <= int(ref) <= INT4_MAX:
        team = await session.get(SalesTeam, int(ref))
    if team is None:
        raise TeamNotFound()
    return team


async def find_user(session: AsyncSession, ref: str) -> User:
    """The user named `ref` exactly or, failing that, whose id `ref` is; UserNotFound."""
    user = await session.scalar(select(User).where(User.username == ref))
    if user is None and ref.isascii() and ref.isdigit() and 1 <= int(ref) <= INT4_MAX:
        user = await session.get(User, int(ref))
    if user is None:
        raise UserNotFound()
    return user


async def _flush_unique(session: AsyncSession, team: SalesTeam) -> None:
    """Flush `team`'s changes; a name another team holds is TeamNameTaken (the
    savepoint keeps the caller's transaction usable, even after a lost race)."""
    taken = await session.scalar(
        select(SalesTeam.id).where(SalesTeam.name == team.name, SalesTeam.id != team.id)
        if team.id is not None
        else select(SalesTeam.id).where(SalesTeam.name == team.name)
    )
    if taken is not None:
        raise TeamNameTaken()
    try:
        async with session.begin_nested():
            session.add(team)
    except IntegrityError:
        raise TeamNameTaken() from None


async def create_team(session: AsyncSession, name: str, region: str | None = None) -> SalesTeam:
    """A new, empty team; TeamNameTaken when the name is in use. Not committed here."""
    team = SalesTeam(name=name, region=region)
    await _flush_unique(session, team)
    logger.info("team.created", team_id=team.id)
    return team


async def update_team(session: AsyncSession, team_id: int, fields: dict[str, object]) -> SalesTeam:
    """Apply `fields` (`name`, `region`) to the team; TeamNotFound, TeamNameTaken."""
    team = await get_team(session, team_id)
    for name, value in fields.items():
        setattr(team, name, value)
    await _flush_unique(session, team)
    logger.info("team.updated", team_id=team.id, fields=sorted(fields))
    return team


async def assign_user(session: AsyncSession, user: User, team: SalesTeam | None) -> User:
    """Put `user` in `team` (None: in no team). What they read changes at once: their
    new team's data, and no longer the old one's. Not committed here."""
    previous = user.sales_team_id
    user.sales_team_id = team.id if team is not None else None
    await session.flush()
    logger.info(
        "team.member_assigned",
        target_user_id=user.id,
        sales_team_id=user.sales_team_id,
        previous_sales_team_id=previous,
    )
    return user


def as_rows(teams: Sequence[tuple[SalesTeam, int]]) -> list[dict[str, object]]:
    """Teams as plain dicts (the CLI's JSON and table rows)."""
    return [
        {
            "id": team.id,
            "name": team.name,
            "region": team.region,
            "member_count": count,
            "created_at": team.created_at.isoformat(),
        }
        for team, count in teams
    ]
