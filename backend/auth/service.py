"""Registration and credential checks."""

from __future__ import annotations

import anyio
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.schemas import USERNAME_MAX_LENGTH, RegisterRequest
from backend.auth.security import dummy_hash, hash_password, verify_password
from backend.config import Settings
from backend.errors import Unauthorized
from backend.models import Role, User


def can_be_username(name: str) -> bool:
    """Whether `name` fits the username column at all (the login form takes any text)."""
    return 0 < len(name) <= USERNAME_MAX_LENGTH and "\x00" not in name


async def register(session: AsyncSession, settings: Settings, data: RegisterRequest) -> User | None:
    """Create a viewer account; None, with nothing written, when the username or
    email is taken.

    The password is hashed either way, so a taken name costs the same time as a
    free one: callers that must not reveal which it was (self-registration) can
    answer both alike.
    """
    hashed = await anyio.to_thread.run_sync(hash_password, data.password, settings.BCRYPT_ROUNDS)
    taken = await session.scalar(
        select(func.count())
        .select_from(User)
        .where(or_(User.username == data.username, User.email == data.email.lower()))
    )
    if taken:
        return None
    user = User(
        username=data.username,
        email=data.email.lower(),
        hashed_password=hashed,
        role=Role.VIEWER,
        is_active=True,
    )
    try:
        # A savepoint: losing a race with a concurrent registration of the same name
        # undoes this insert only, not the caller's transaction.
        async with session.begin_nested():
            session.add(user)
    except IntegrityError:
        return None
    return user


async def authenticate(
    session: AsyncSession, settings: Settings, username: str, password: str
) -> User:
    """The active user with these credentials; every failure is the same 401.

    A name no account can have (longer than the column, or with a NUL, which
    PostgreSQL text cannot hold) is not looked up, and fails like a wrong password.
    """
    user = None
    if can_be_username(username):
        user = await session.scalar(select(User).where(User.username == username))
    hashed = user.hashed_password if user else dummy_hash(settings.BCRYPT_ROUNDS)
    ok = await anyio.to_thread.run_sync(verify_password, password, hashed)
    if user is None or not ok or not user.is_active:
        raise Unauthorized("Incorrect username or password")
    return user
