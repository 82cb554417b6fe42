"""Registration and credential checks."""

from __future__ import annotations

import anyio
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.schemas import RegisterRequest
from backend.auth.security import dummy_hash, hash_password, verify_password
from backend.config import Settings
from backend.errors import Conflict, Unauthorized
from backend.models import Role, User


async def register(session: AsyncSession, settings: Settings, data: RegisterRequest) -> User:
    """Create a viewer account; a taken username or email is a conflict."""
    taken = await session.scalar(
        select(func.count())
        .select_from(User)
        .where(or_(User.username == data.username, User.email == data.email.lower()))
    )
    if taken:
        raise Conflict("Username or email is already registered")
    hashed = await anyio.to_thread.run_sync(hash_password, data.password, settings.BCRYPT_ROUNDS)
    user = User(
        username=data.username,
        email=data.email.lower(),
        hashed_password=hashed,
        role=Role.VIEWER,
        is_active=True,
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError:
        # Lost a race with a concurrent registration of the same name.
        raise Conflict("Username or email is already registered") from None
    return user


async def authenticate(
    session: AsyncSession, settings: Settings, username: str, password: str
) -> User:
    """The active user with these credentials; every failure is the same 401."""
    user = await session.scalar(select(User).where(User.username == username))
    hashed = user.hashed_password if user else dummy_hash(settings.BCRYPT_ROUNDS)
    ok = await anyio.to_thread.run_sync(verify_password, password, hashed)
    if user is None or not ok or not user.is_active:
        raise Unauthorized("Incorrect username or password")
    return user
