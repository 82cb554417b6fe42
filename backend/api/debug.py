"""Routes that exist only when ENVIRONMENT=test: a slow request and a crashing one.

The hardening tests need a request that stays in flight (graceful shutdown,
request timeout) and one that raises (the 500 envelope). They are never
mounted in any other environment.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query

router = APIRouter(prefix="/_test", include_in_schema=False)


@router.get("/slow")
async def slow(seconds: Annotated[float, Query(ge=0, le=60)] = 1.0) -> dict[str, float]:
    """Answer after `seconds`."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@router.get("/crash")
async def crash() -> None:
    """Raise an exception carrying text that must never reach the client."""
    raise RuntimeError("secret-internal-detail /srv/app/backend/module.py SELECT * FROM users")
