"""Bodies of the sales teams endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints, field_validator
from pydantic.json_schema import SkipJsonSchema

# The sales_teams columns are VARCHAR(100); no control characters (PostgreSQL text
# cannot hold NUL, and a name is shown in tables and logs).
TeamName = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$"
    ),
]
Region = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$"
    ),
]


class TeamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: TeamName
    region: Region | None = None


class TeamUpdate(BaseModel):
    """Fields an admin may change; omitted fields stay as they are. `region` may be
    null (no region); `name` may be omitted but never null."""

    model_config = ConfigDict(extra="forbid")

    name: TeamName | SkipJsonSchema[None] = None
    region: Region | None = None

    @field_validator("name")
    @classmethod
    def not_null(cls, value: object) -> object:
        # Runs only for values sent (defaults are not validated): an explicit null.
        if value is None:
            raise ValueError("may be omitted but not null")
        return value


class TeamRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    region: str | None
    created_at: datetime
    # How many users are in the team now.
    member_count: int
