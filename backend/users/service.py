"""User administration and the bootstrap admin account."""

from __future__ import annotations

import secrets
import sys

import anyio
import structlog
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.schemas import RegisterRequest, check_password
from backend.auth.security import hash_password
from backend.auth.service import can_be_username, register
from backend.config import ConfigurationError, Settings
from backend.errors import BadRequest, Conflict, NotFound
from backend.models import Role, SalesTeam, User
from backend.pagination import PageParams
from backend.users.schemas import UserUpdate

logger = structlog.get_logger(__name__)

# Key of the PostgreSQL advisory lock that serialises admin seeding: every API
# worker and task seeds at start-up, and during a deploy several start at once.
ADMIN_SEED_LOCK_KEY = 0x4C45_0001


async def list_users(session: AsyncSession, page: PageParams) -> tuple[list[User], int]:
    total = await session.scalar(select(func.count()).select_from(User)) or 0
    rows = await session.scalars(
        select(User).order_by(User.id).limit(page.limit).offset(page.offset)
    )
    return list(rows), total


async def users_for_report(session: AsyncSession, role: Role | None = None) -> list[User]:
    """Every user (or every user with `role`), ordered by id: the operator's listing."""
    query = select(User).order_by(User.id)
    if role is not None:
        query = query.where(User.role == role)
    return list(await session.scalars(query))


async def create_user(
    session: AsyncSession, settings: Settings, data: RegisterRequest, role: Role
) -> User:
    """Register an account (same checks as self-registration) with `role`.

    A taken username or email is a `Conflict`; nothing is committed here.
    """
    user = await register(session, settings, data)
    if user is None:
        raise Conflict("Username or email is already registered")
    user.role = role
    await session.flush()
    logger.info("user.created", target_user_id=user.id, role=role.value)
    return user


async def set_password(
    session: AsyncSession, settings: Settings, username: str, password: str
) -> User:
    """Give the account `username` a new password (the operator's reset).

    The password must meet the account policy (pydantic's ValidationError
    otherwise); it is hashed with BCRYPT_ROUNDS. `NotFound` when there is no
    such user. Active or not, the account keeps its state; nothing is committed
    here. Tokens issued before stay valid until they expire (they carry no
    password state).
    """
    check_password(password)
    user = None
    if can_be_username(username):
        user = await session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound("User not found")
    user.hashed_password = await anyio.to_thread.run_sync(
        hash_password, password, settings.BCRYPT_ROUNDS
    )
    await session.flush()
    logger.info("user.password_reset", target_user_id=user.id)
    return user


async def update_user(
    session: AsyncSession, actor: User, user_id: int, changes: UserUpdate
) -> User:
    """Apply an admin's changes; an admin cannot lock themselves out."""
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("User not found")
    fields = changes.model_dump(exclude_unset=True)
    if user.id == actor.id and (
        fields.get("is_active") is False or fields.get("role", Role.ADMIN) != Role.ADMIN
    ):
        raise Conflict("Admins cannot demote or deactivate themselves")
    team_id = fields.get("sales_team_id")
    if team_id is not None and await session.get(SalesTeam, team_id) is None:
        raise BadRequest("Unknown sales_team_id")
    for name, value in fields.items():
        setattr(user, name, value)
    await session.flush()
    logger.info("user.updated", target_user_id=user.id, fields=sorted(fields))
    return user


async def ensure_admin(session: AsyncSession, settings: Settings) -> User | None:
    """Create the bootstrap admin when no admin exists; None when one already does.

    Without ADMIN_PASSWORD, development and test generate one and print it once to
    the console (never to the log); staging and production refuse.
    """
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        # Held until this transaction ends, so a process starting beside this one
        # waits, then sees the admin this one committed instead of racing to insert it.
        await session.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADMIN_SEED_LOCK_KEY}
        )
    existing = await session.scalar(select(User.id).where(User.role == Role.ADMIN).limit(1))
    if existing is not None:
        return None
    password = settings.ADMIN_PASSWORD.get_secret_value() if settings.ADMIN_PASSWORD else ""
    generated = False
    if not password:
        if settings.ENVIRONMENT in ("staging", "production"):
            raise ConfigurationError("ADMIN_PASSWORD must be set to seed the admin account")
        password = secrets.token_urlsafe(18)
        generated = True
    clash = await session.scalar(
        select(User).where(
            (User.username == settings.ADMIN_USERNAME)
            | (User.email == settings.ADMIN_EMAIL.lower())
        )
    )
    if clash is not None:
        raise ConfigurationError(
            "cannot seed the admin: ADMIN_USERNAME or ADMIN_EMAIL belongs to a non-admin user"
        )
    hashed = await anyio.to_thread.run_sync(hash_password, password, settings.BCRYPT_ROUNDS)
    user = User(
        username=settings.ADMIN_USERNAME,
        email=settings.ADMIN_EMAIL.lower(),
        hashed_password=hashed,
        role=Role.ADMIN,
        is_active=True,
    )
    session.add(user)
    await session.flush()
    logger.info("admin.seeded", username=user.username, generated_password=generated)
    if generated:
        # Shown once to the operator, deliberately not logged.
        print(
            f"\n  Admin account created: username={user.username} password={password}\n"
            "  (generated because ADMIN_PASSWORD is unset; it is not shown again)\n",
            file=sys.stderr,
            flush=True,
        )
    return user
