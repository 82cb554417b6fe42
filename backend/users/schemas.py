"""Bodies of the users admin endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from backend.models import Role


class UserUpdate(BaseModel):
    """Fields an admin may change; omitted fields stay as they are."""

    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    is_active: bool | None = None
    sales_team_id: int | None = None
