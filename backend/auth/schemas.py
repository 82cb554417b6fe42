"""Request and response bodies of the auth endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, EmailStr, Field, TypeAdapter

from backend.models import Role

USERNAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
# The users.username column is VARCHAR(50).
USERNAME_MAX_LENGTH = 50

# The password policy of every account, however the password is set (registration,
# the operator CLI's create-user and reset-password): this one place.
PASSWORD_MIN_LENGTH = 12
PASSWORD_MAX_LENGTH = 256
Password = Annotated[str, Field(min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH)]
_password_policy: TypeAdapter[str] = TypeAdapter(Password)


def check_password(password: str) -> str:
    """`password` when it meets the policy; pydantic's ValidationError otherwise (its
    errors name the rule broken and, like any input error, carry the value)."""
    return _password_policy.validate_python(password)


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=3, max_length=USERNAME_MAX_LENGTH, pattern=USERNAME_PATTERN)
    email: EmailStr = Field(max_length=320)
    password: Password


class RegistrationAccepted(BaseModel):
    """The answer to every valid registration, whether the account was created or the
    username or email was already taken: the two must not be told apart."""

    status: Literal["accepted"] = "accepted"
    message: str = (
        "If this username and email were not registered yet, the account now exists: "
        "sign in with them."
    )


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int


class UserRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    email: str
    role: Role
    is_active: bool
    sales_team_id: int | None
    created_at: datetime
