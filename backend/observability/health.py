"""Health endpoints for load balancer target groups.

- GET /health, /health/live: liveness, no I/O, 200 `{"status": "ok"}` (also while draining).
- GET /health/ready: readiness. Database, storage and system checks run
  concurrently, each bounded by HEALTH_CHECK_TIMEOUT; 200 when every component is
  healthy or degraded, 503 when any is unhealthy or the process is draining.

Each also answers HEAD exactly as GET (same status and headers, no body), since
some probes and uptime monitors only send HEAD.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import psutil
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.utils import suppress_instrumentation
from pydantic import BaseModel
from sqlalchemy import text

from backend.config import Settings

logger = structlog.get_logger(__name__)
router = APIRouter(tags=["health"])

DB_DEGRADED_MS = 100.0
# A valid storage path (`<area>/<key>`) that is never written: only the answer matters.
STORAGE_PROBE_PATH = "inputs/.health-probe"
# psutil thresholds (percent used): above DEGRADED -> degraded, above UNHEALTHY -> unhealthy.
RESOURCE_DEGRADED = 90.0
RESOURCE_UNHEALTHY = 95.0

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
_RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}


@dataclass
class ComponentHealth:
    """The outcome of one check. `error` names the failure, never its message."""

    status: str
    latency_ms: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "latency_ms": self.latency_ms}
        if self.details:
            body["details"] = self.details
        if self.error:
            body["error"] = self.error
        return body


async def check_database(request: Request) -> ComponentHealth:
    """SELECT 1 through the application's pool; slower than 100 ms is degraded.

    The probe goes through the database breaker: while it is open the answer is
    unhealthy at once ("circuit_open"); once it is due, this probe is the one call
    let through, so readiness itself closes the breaker when the database is back
    (the load balancer sends no traffic to an unready target to do it).
    """
    database = request.app.state.db
    breaker = database.breaker
    if not breaker.allow():
        return ComponentHealth(UNHEALTHY, error="circuit_open", details={"circuit": "open"})
    started = time.perf_counter()
    try:
        # Probes every few seconds must not fill the trace store with orphan SQL spans.
        with suppress_instrumentation():
            async with database.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except asyncio.CancelledError:
        # Cut off by HEALTH_CHECK_TIMEOUT: the database did not answer in time.
        breaker.failure(TimeoutError())
        raise
    except Exception as exc:
        breaker.failure(exc)
        raise
    breaker.success()
    latency = round((time.perf_counter() - started) * 1000, 2)
    pool = database.engine.pool
    details: dict[str, Any] = {"circuit": breaker.state}
    if hasattr(pool, "checkedout"):
        details.update(pool_size=pool.size(), checked_out=pool.checkedout())
    status = HEALTHY if latency <= DB_DEGRADED_MS else DEGRADED
    return ComponentHealth(status, latency, details)


def _local_root_writable(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".health-{uuid.uuid4().hex}"
    probe.write_bytes(b"ok")
    probe.unlink()


async def check_storage(request: Request) -> ComponentHealth:
    """The storage answers (and, for local storage, its root is writable).

    `app.state.storage` is used when present: its `health()` if it has one (False
    means unhealthy), else `exists()` on a probe path, where any answer, True or
    False, proves the backend is reachable. Without it, local storage is checked
    on disk and any other type is reported degraded ("not_checked").
    """
    settings: Settings = request.app.state.settings
    storage = getattr(request.app.state, "storage", None)
    backend = type(storage).__name__ if storage is not None else settings.STORAGE_TYPE
    started = time.perf_counter()
    health = getattr(storage, "health", None)
    exists = getattr(storage, "exists", None)
    if callable(health):
        if await health() is False:
            return ComponentHealth(UNHEALTHY, error="check_failed", details={"backend": backend})
    elif callable(exists):
        await exists(STORAGE_PROBE_PATH)
    elif settings.STORAGE_TYPE != "local":
        return ComponentHealth(DEGRADED, error="not_checked", details={"backend": backend})
    if settings.STORAGE_TYPE == "local":
        await asyncio.to_thread(_local_root_writable, Path(settings.STORAGE_LOCAL_ROOT))
    latency = round((time.perf_counter() - started) * 1000, 2)
    return ComponentHealth(HEALTHY, latency, {"backend": backend})


def _system_snapshot(storage_root: Path) -> dict[str, float]:
    memory = psutil.virtual_memory()
    # The disk that matters is the one uploads land on.
    disk = psutil.disk_usage(str(storage_root) if storage_root.exists() else os.sep)
    return {
        # interval=None: usage since the previous call, without sleeping.
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory_percent": round(memory.percent, 1),
        "memory_available_mb": round(memory.available / (1024 * 1024)),
        "disk_percent": round(disk.percent, 1),
        "disk_free_gb": round(disk.free / (1024**3), 1),
    }


async def check_system(request: Request) -> ComponentHealth:
    """Memory and disk use against the thresholds; CPU is reported only."""
    settings: Settings = request.app.state.settings
    snapshot = await asyncio.to_thread(_system_snapshot, Path(settings.STORAGE_LOCAL_ROOT))
    worst = max(snapshot["memory_percent"], snapshot["disk_percent"])
    if worst > RESOURCE_UNHEALTHY:
        status = UNHEALTHY
    elif worst > RESOURCE_DEGRADED:
        status = DEGRADED
    else:
        status = HEALTHY
    return ComponentHealth(status, 0.0, snapshot)


CHECKS: dict[str, Callable[[Request], Awaitable[ComponentHealth]]] = {
    "database": check_database,
    "storage": check_storage,
    "system": check_system,
}


async def _bounded(
    check: Callable[[Request], Awaitable[ComponentHealth]], request: Request
) -> ComponentHealth:
    """Run one check within HEALTH_CHECK_TIMEOUT; a failure or a timeout is `unhealthy`."""
    settings: Settings = request.app.state.settings
    started = time.perf_counter()
    try:
        async with asyncio.timeout(settings.HEALTH_CHECK_TIMEOUT):
            return await check(request)
    except TimeoutError:
        error = "timeout"
    except Exception as exc:  # a failing dependency is a status, not a crash
        error = type(exc).__name__
    latency = round((time.perf_counter() - started) * 1000, 2)
    return ComponentHealth(UNHEALTHY, latency, error=error)


def _log_transitions(request: Request, results: dict[str, ComponentHealth]) -> None:
    # The ALB probes every few seconds: log when a component changes state, not per probe.
    previous: dict[str, str] = getattr(request.app.state, "health_last", {})
    for name, result in results.items():
        before = previous.get(name, HEALTHY)
        if result.status != before:
            log = logger.warning if result.status != HEALTHY else logger.info
            log(
                "health.component.changed",
                component=name,
                status=result.status,
                previous=before,
                error=result.error,
            )
    request.app.state.health_last = {name: r.status for name, r in results.items()}


def _base_body(request: Request, status: str) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    started = getattr(request.app.state, "started_at", None)
    return {
        "status": status,
        "timestamp": datetime.now(UTC).isoformat(),
        "uptime_seconds": round(time.monotonic() - started, 1) if started else 0.0,
        "version": settings.APP_VERSION,
        "environment": settings.ENVIRONMENT,
    }


class Liveness(BaseModel):
    status: Literal["ok"]


class ComponentReport(BaseModel):
    status: Literal["healthy", "degraded", "unhealthy"]
    latency_ms: float
    details: dict[str, Any] | None = None
    error: str | None = None


class Readiness(BaseModel):
    """The readiness body; `components` only with HEALTH_INCLUDE_DETAILS."""

    status: Literal["healthy", "degraded", "unhealthy", "draining"]
    timestamp: datetime
    uptime_seconds: float
    version: str
    environment: str
    components: dict[str, ComponentReport] | None = None


Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Any]])


def probe(path: str, **route: Any) -> Callable[[Endpoint], Endpoint]:
    """Register `endpoint` for GET and for HEAD on `path` (HEAD as its own operation)."""

    def register(endpoint: Endpoint) -> Endpoint:
        router.add_api_route(path, endpoint, methods=["GET"], **route)
        # A name of its own: one route per method keeps the OpenAPI operation ids unique.
        head_name = f"{endpoint.__name__}_head"
        router.add_api_route(path, endpoint, methods=["HEAD"], name=head_name, **route)
        return endpoint

    return register


@probe("/health", response_model=Liveness)
async def health() -> dict[str, str]:
    """Liveness: the process answers. No I/O."""
    return {"status": "ok"}


@probe("/health/live", response_model=Liveness)
async def health_live() -> dict[str, str]:
    """Liveness (same as /health); stays 200 while draining."""
    return {"status": "ok"}


@probe(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Unhealthy or draining"}},
)
async def health_ready(request: Request) -> JSONResponse:
    """Readiness for the load balancer: 200 healthy/degraded, 503 unhealthy or draining."""
    if getattr(request.app.state, "draining", False):
        return JSONResponse(_base_body(request, "draining"), status_code=503)
    body = await full_health(request)
    settings: Settings = request.app.state.settings
    if not settings.HEALTH_INCLUDE_DETAILS:
        del body["components"], body["circuits"]
    return JSONResponse(body, status_code=503 if body["status"] == UNHEALTHY else 200)


async def full_health(request: Request) -> dict[str, Any]:
    """Every check, run concurrently and each bounded; the body with all components."""
    names = list(CHECKS)
    outcomes = await asyncio.gather(*(_bounded(CHECKS[n], request) for n in names))
    results = dict(zip(names, outcomes, strict=True))
    _log_transitions(request, results)
    overall = max((r.status for r in results.values()), key=_RANK.__getitem__)
    body = _base_body(request, overall)
    body["components"] = {name: r.as_dict() for name, r in results.items()}
    body["circuits"] = circuits(request)
    return body


def circuits(request: Request) -> dict[str, Any]:
    """This process's circuit breakers by dependency (state, failures, refusals)."""
    breakers: dict[str, Any] = getattr(request.app.state, "breakers", {})
    return {name: breaker.describe() for name, breaker in breakers.items()}
