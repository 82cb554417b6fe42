"""Bodies of the users admin endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from backend.models import INT4_MAX, Role


class UserUpdate(BaseModel):
    """Fields an admin may change; omitted fields stay as they are."""

    model_config = ConfigDict(extra="forbid")

    # May be omitted, never null: None only stands for "not given" (hidden from the schema).
    role: Role | SkipJsonSchema[None] = None
    is_active: bool | SkipJsonSchema[None] = None
    # null takes the user out of any team; a number must be a sales team's id.
    sales_team_id: int | None = Field(default=None, ge=1, le=INT4_MAX)

    @field_validator("role", "is_active")
    @classmethod
    def not_null(cls, value: object) -> object:
        # Runs only for values sent (defaults are not validated): an explicit null.
        if value is None:
            raise ValueError("may be omitted but not null")
        return value
