"""GET /metrics: this process's series as Prometheus text (METRICS_ENABLED).

A scrape describes the one process that answers it. Behind one port with
several uvicorn workers, successive scrapes would land on different workers
and their counters would jump back and forth, so there the endpoint refuses
with 503 and points at the multi-process path: OTLP push from every process to
the collector, which Prometheus scrapes instead. With METRICS_TOKEN set, a
scrape must send it as a bearer token (Prometheus' `authorization` setting).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backend.config import Settings
from backend.errors import NotFound, ServiceUnavailable, Unauthorized
from backend.observability.metrics import process_metrics, worker_count

router = APIRouter(tags=["metrics"])


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def prometheus_metrics(request: Request) -> Response:
    """This process's metrics in the Prometheus text format."""
    settings: Settings = request.app.state.settings
    current = process_metrics()
    if not settings.METRICS_ENABLED or current is None:
        raise NotFound("Metrics are not enabled (METRICS_ENABLED)")
    token = settings.METRICS_TOKEN.get_secret_value()
    if token and not _authorized(request, token):
        raise Unauthorized("A valid metrics token is required")
    workers = worker_count()
    if workers > 1:
        raise ServiceUnavailable(
            "This process is one of several workers; a scrape here would show one "
            "worker's counts at random. Scrape the OpenTelemetry collector, which "
            "receives every process's metrics over OTLP.",
            details={"workers": workers, "metrics_path": "OTLP push to the collector"},
        )
    if current.registry is None:
        # Metrics started in a process that was one of several workers: no reader here.
        raise NotFound("This process keeps no Prometheus series")
    return Response(generate_latest(current.registry), media_type=CONTENT_TYPE_LATEST)
