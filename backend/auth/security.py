"""Password hashing (bcrypt) and access tokens (JWT, HS*)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import bcrypt
from jose import JWTError, jwt

from backend.config import Settings


class InvalidToken(Exception):
    """The token is malformed, badly signed, expired or lacks a required claim."""


def _prehash(password: str) -> bytes:
    # bcrypt reads at most 72 bytes; a SHA-256 digest first lets every character count.
    return base64.b64encode(hashlib.sha256(password.encode("utf-8")).digest())


def hash_password(password: str, rounds: int = 12) -> str:
    return bcrypt.hashpw(_prehash(password), bcrypt.gensalt(rounds=rounds)).decode("ascii")


def verify_password(password: str, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(_prehash(password), hashed.encode("ascii"))
    except ValueError:
        return False


@lru_cache(maxsize=4)
def dummy_hash(rounds: int) -> str:
    """A hash to check against when the user is unknown, so both paths cost the same."""
    return hash_password("not-a-real-password-for-timing", rounds)


def create_access_token(
    settings: Settings, subject: str, role: str, now: datetime | None = None
) -> tuple[str, int]:
    """A signed token for `subject` and its lifetime in seconds."""
    issued = now or datetime.now(UTC)
    lifetime = timedelta(minutes=settings.ACCESS_TOKEN_EXPIRE_MINUTES)
    claims = {
        "sub": subject,
        "role": role,
        "iat": int(issued.timestamp()),
        "exp": int((issued + lifetime).timestamp()),
    }
    token = jwt.encode(claims, settings.secret_key, algorithm=settings.JWT_ALGORITHM)
    return token, int(lifetime.total_seconds())


def decode_access_token(settings: Settings, token: str) -> dict[str, Any]:
    """Verified claims of `token`; only the configured algorithm is accepted."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.secret_key,
            algorithms=[settings.JWT_ALGORITHM],
            options={"require_exp": True, "require_sub": True, "require_iat": True},
        )
    except (JWTError, ValueError, TypeError) as exc:
        raise InvalidToken(type(exc).__name__) from None
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise InvalidToken("missing sub")
    return claims
