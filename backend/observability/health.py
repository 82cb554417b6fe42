"""Health endpoints for load balancer target groups."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. No I/O."""
    return {"status": "ok"}
