"""/admin: diagnostics for admins (metrics, full health, effective config, runtime).

Mounted only when ADMIN_DIAGNOSTICS_ENABLED; every endpoint needs the admin role.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import UTC, datetime
from typing import Any

import psutil
from fastapi import APIRouter, Request

from backend.api.dependencies import AdminUser, DatabaseDep, SettingsDep
from backend.config import config_summary
from backend.observability.health import circuits, full_health
from backend.observability.metrics import AdminMetrics

router = APIRouter(prefix="/admin", tags=["admin"])


def _metrics(request: Request) -> AdminMetrics:
    collector: AdminMetrics = request.app.state.metrics
    return collector


@router.get("/metrics")
async def metrics(request: Request, _admin: AdminUser) -> dict[str, Any]:
    """Request counts, error rates, latency percentiles and pipeline runs of this process,
    read off the same instruments as /metrics and OTLP (`scope` says which process)."""
    body = _metrics(request).snapshot()
    limiter = getattr(request.app.state, "rate_limiter", None)
    if limiter is not None:
        body["rate_limit"] = {
            "rejected": limiter.rejected,
            "storage_errors": limiter.storage_errors,
            "blocked_clients": limiter.blocked_clients,
        }
    body["circuits"] = circuits(request)
    return body


@router.post("/metrics/reset")
async def reset_metrics(request: Request, _admin: AdminUser) -> dict[str, str]:
    """Start a new metrics window (totals since start-up stay)."""
    _metrics(request).reset_window()
    return {"status": "reset"}


@router.get("/health/detailed")
async def health_detailed(request: Request, _admin: AdminUser) -> dict[str, Any]:
    """Readiness with every component's details, whatever HEALTH_INCLUDE_DETAILS says."""
    return await full_health(request)


@router.get("/config")
async def runtime_config(settings: SettingsDep, _admin: AdminUser) -> dict[str, Any]:
    """The effective settings; secrets only as set / not set, URL passwords masked."""
    return config_summary(settings)


@router.get("/info")
async def runtime_info(database: DatabaseDep, _admin: AdminUser) -> dict[str, Any]:
    """Interpreter, host and connection pool of this process."""
    pool: Any = database.engine.pool
    pool_stats: dict[str, Any] = {"class": type(pool).__name__}
    for name in ("size", "checkedout", "checkedin", "overflow"):
        method = getattr(pool, name, None)
        if callable(method):
            pool_stats[name] = method()
    process = psutil.Process()
    memory = process.memory_info()
    return {
        "timestamp": datetime.now(UTC).isoformat(),
        "python_version": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "architecture": platform.machine(),
        "pid": os.getpid(),
        "process": {
            "rss_mb": round(memory.rss / 2**20, 1),
            "threads": process.num_threads(),
            "open_files": len(process.open_files()),
        },
        "database": {"dialect": database.engine.dialect.name, "pool": pool_stats},
    }
