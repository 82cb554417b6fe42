"""Metrics as users get them: OTLP at a real receiver, Prometheus text on /metrics
from a real uvicorn process, and what /metrics does under several workers."""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.tests.hardening_support import VENV_BIN, closed_port, free_port
from backend.tests.metric_names import EXPORTED_METRICS, names_in_dashboards_and_docs
from backend.tests.obs_helpers import OtlpReceiver
from backend.tests.pipeline_support import KNOWN_TAPE
from backend.tests.worker_support import (
    Api,
    Process,
    api_server,
    process_env,
    wait_for,
    wait_ready,
)

# What the API process records over a request and an in-process pipeline run.
API_INSTRUMENTS = {
    "http.server.request.duration",
    "http.server.active_requests",
    "loan_engine.pipeline.runs",
    "loan_engine.pipeline.loans",
    "loan_engine.pipeline.phase.duration",
    "loan_engine.pipeline.queue.wait",
    "loan_engine.pipeline.queue.depth",
    "loan_engine.pipeline.exceptions",
    "loan_engine.ratelimit.decisions",
    "loan_engine.ratelimit.storage.errors",
    "loan_engine.db.pool.size",
    "loan_engine.db.pool.checked_out",
    "loan_engine.db.pool.overflow",
    "loan_engine.db.slow_queries",
    "loan_engine.spans.exported",
    "loan_engine.circuit.state",
}

HTTP_DURATION = "http.server.request.duration"


def exercise(api: Api) -> str:
    """A request on a templated route and a whole pipeline run; the run's id."""
    run_id = str(api.submit(api.upload("known.csv", KNOWN_TAPE))["run_id"])
    assert api.wait_finished(run_id)["status"] == "completed"
    assert api.client.get(f"/api/pipeline/runs/{run_id}").status_code == 200
    missing = api.client.get(f"/api/pipeline/runs/{uuid.uuid4()}")
    assert missing.status_code == 404
    return run_id


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_api_process_pushes_its_metrics_over_otlp(clean_db: str, tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "otlp",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            # Limits counted in a storage that refuses: decisions and storage errors.
            "RATE_LIMIT_ENABLED": "true",
            "RATE_LIMIT_STORAGE_URL": f"redis://127.0.0.1:{closed_port()}/0",
            "DB_SLOW_QUERY_MS": "0",
        }
        with api_server(tmp_path, "api", **env) as server:
            api = Api(wait_ready(server))
            exercise(api)
            api.close()

            def received() -> set[str]:
                return {metric.name for _resource, metric in receiver.metrics()}

            wait_for(lambda: received() >= API_INSTRUMENTS, "every instrument at the receiver")

            def latest_duration() -> Any:
                found = [m for _r, m in receiver.metrics() if m.name == HTTP_DURATION]
                return found[-1] if found else None

            def duration_routes() -> set[str]:
                return {
                    attr.value.string_value
                    for point in latest_duration().histogram.data_points
                    for attr in point.attributes
                    if attr.key == "http.route"
                }

            # An export collected while the last requests were in flight lacks their
            # route; the next one (cumulative) has it.
            wait_for(
                lambda: "/api/pipeline/runs/{run_id}" in duration_routes(),
                "the templated route in an exported duration histogram",
            )
            resources = {r["service.instance.id"] for r, _m in receiver.metrics()}
            names = {r["service.name"] for r, _m in receiver.metrics()}

    assert names == {"loan-engine"} and len(resources) == 1
    by_name = {metric.name: metric for _r, metric in receiver.metrics()}
    duration = latest_duration()
    routes = duration_routes()
    assert "/api/pipeline/runs/{run_id}" in routes
    assert not any(route.startswith("/health") for route in routes)
    # Exemplars: a sampled request's trace id rides on its latency bucket.
    exemplars = [e for point in duration.histogram.data_points for e in point.exemplars]
    assert exemplars and all(len(e.trace_id) == 16 for e in exemplars)
    phases = {
        attr.value.string_value
        for point in by_name["loan_engine.pipeline.phase.duration"].histogram.data_points
        for attr in point.attributes
    }
    assert {"ingest", "validate", "persist", "report"} <= phases


def served_names(text: str) -> set[str]:
    """Metric names as a scrape serves them (counters with `_total`, histograms by base)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_metrics_endpoint_serves_prometheus_text_with_route_templates(
    clean_db: str, tmp_path: Path
) -> None:
    """Also the cross-check: every metric a dashboard, a doc or a config names is in a
    live scrape (the events that feed the rarer ones are provoked here: slow queries,
    a limiter storage that refuses, a span queue of one)."""
    with OtlpReceiver() as receiver:
        env = {
            "METRICS_TOKEN": "scrape-secret",
            "DB_SLOW_QUERY_MS": "0",
            "RATE_LIMIT_ENABLED": "true",
            "RATE_LIMIT_STORAGE_URL": f"redis://127.0.0.1:{closed_port()}/0",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_MAX_QUEUE_SIZE": "1",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1",
        }
        with api_server(tmp_path, "api", **env) as server:
            url = wait_ready(server)
            api = Api(url)
            run_id = exercise(api)
            api.close()
            anonymous = httpx.get(f"{url}/metrics")
            auth = {"Authorization": "Bearer scrape-secret"}

            def scraped_everything() -> httpx.Response | None:
                response = httpx.get(f"{url}/metrics", headers=auth)
                return response if served_names(response.text) >= EXPORTED_METRICS else None

            scrape = wait_for(scraped_everything, "every exported metric in a scrape", 30)

    served = served_names(scrape.text)
    for source, names in names_in_dashboards_and_docs().items():
        assert names <= served, (source, names - served)

    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain")
    found = families(scrape.text)
    duration = found["http_server_request_duration_seconds"]
    routes = {sample.labels.get("http_route") for sample in duration.samples}
    assert "/api/pipeline/runs/{run_id}" in routes
    assert not any(run_id in (route or "") for route in routes)  # never the raw path
    assert not any((route or "").startswith("/health") for route in routes)
    runs = found["loan_engine_pipeline_runs"]
    completed = [s for s in runs.samples if s.labels.get("status") == "completed"]
    assert completed and completed[0].value >= 1
    for name in (
        "loan_engine_pipeline_loans",
        "loan_engine_pipeline_phase_duration_seconds",
        "loan_engine_pipeline_queue_wait_seconds",
        "loan_engine_pipeline_exceptions",
        "loan_engine_db_pool_size",
        "loan_engine_db_pool_checked_out",
        "loan_engine_circuit_state",
        "http_server_active_requests",
    ):
        assert name in found, name


@pytest.mark.parametrize("how", ["--workers", "WEB_CONCURRENCY"])
def test_several_workers_refuse_a_scrape_and_push_over_otlp(
    clean_db: str, tmp_path: Path, how: str
) -> None:
    """Two uvicorn workers behind one port: /metrics refuses every time (a scrape would
    flip between the workers' counts); both workers' series reach the collector."""
    port = free_port()
    with OtlpReceiver() as receiver:
        env = process_env(
            tmp_path,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_METRICS_EXPORTER="otlp",
            OTEL_METRIC_EXPORT_INTERVAL="300",
        )
        argv = [str(VENV_BIN / "uvicorn"), "backend.api.main:app", "--host", "127.0.0.1"]
        argv += ["--port", str(port)]
        if how == "--workers":
            argv += ["--workers", "2"]
        else:
            env["WEB_CONCURRENCY"] = "2"
        server = Process(argv, env, tmp_path / "workers.log")
        server.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        with server:
            url = wait_ready(server)
            answers = [httpx.get(f"{url}/metrics") for _ in range(6)]

            # Keep asking until both workers have sent something (connections are new
            # each time, so the kernel spreads them over both).
            def both_workers() -> bool:
                # A probe only: one refused or reset connection while a worker is still
                # starting is retried by the next poll.
                with contextlib.suppress(httpx.TransportError):
                    httpx.get(f"{url}/api/auth/me")
                instances = {r["service.instance.id"] for r, _m in receiver.metrics()}
                return len(instances) >= 2

            wait_for(both_workers, "metrics from both workers")
    for answer in answers:
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["code"] == "service_unavailable"
        assert "collector" in error["message"] and error["details"]["workers"] == 2
