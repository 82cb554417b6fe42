"""The local observability stack's files: Grafana dashboards and provisioning, the
Prometheus and collector configs, the compose file, and the metric names they and the
docs use (each must be one the service exports)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from backend.tests.metric_names import (
    EXPORTED_METRICS,
    HISTOGRAMS,
    INSTRUMENTS,
    REPO_ROOT,
    dashboard_metric_names,
    names_in_dashboards_and_docs,
    promql_metric_names,
    text_metric_names,
)

OBSERVABILITY = REPO_ROOT / "observability"
DASHBOARDS = sorted((OBSERVABILITY / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = sorted((OBSERVABILITY / "grafana" / "provisioning").rglob("*.yaml"))
COMPOSE = REPO_ROOT / "docker-compose.observability.yml"
COLLECTOR_DEV = REPO_ROOT / "otel-collector" / "config.dev.yaml"
PROMETHEUS_CONFIG = OBSERVABILITY / "prometheus" / "prometheus.yml"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def prometheus_targets(dashboard: Any) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every query of every panel, rows included."""
    found: list[tuple[str, dict[str, Any]]] = []
    pending: list[Any] = list(dashboard["panels"])
    while pending:
        panel = pending.pop(0)
        pending.extend(panel.get("panels", []))
        found.extend((panel["title"], target) for target in panel.get("targets", []))
    return found


def provisioned_datasources() -> dict[str, dict[str, Any]]:
    by_uid: dict[str, dict[str, Any]] = {}
    for path in PROVISIONING:
        for source in load_yaml(path).get("datasources", []):
            by_uid[source["uid"]] = source
    return by_uid


# --- metric names -------------------------------------------------------------------


def test_every_metric_named_in_dashboards_and_docs_is_exported() -> None:
    found = names_in_dashboards_and_docs()

    assert set(found) >= {
        "observability/grafana/dashboards/loan-engine.json",
        "README.md",
        "deploy/aws/README.md",
        "deploy/aws/stack.yaml",
        "otel-collector/config.aws.yaml",
    }
    unknown = {source: names - EXPORTED_METRICS for source, names in found.items()}
    assert {source: names for source, names in unknown.items() if names} == {}


def test_the_dashboard_shows_every_exported_metric() -> None:
    shown = set().union(*(dashboard_metric_names(load_json(path)) for path in DASHBOARDS))

    assert sorted(EXPORTED_METRICS - shown) == []


def test_the_aws_stack_and_its_notes_name_the_alarmed_metrics_as_exported() -> None:
    found = names_in_dashboards_and_docs()
    alarmed = {"loan_engine_pipeline_runs_total", "loan_engine_pipeline_queue_depth"}

    assert found["deploy/aws/stack.yaml"] >= alarmed
    assert found["deploy/aws/README.md"] >= alarmed | {"loan_engine_ratelimit_storage_errors_total"}


def test_promql_names_skip_functions_labels_keywords_and_variables() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, http_route) (rate(a_seconds_bucket{route=~"$route",'
        ' x="b_total"}[$__rate_interval]))) / on (instance) group_left (version) target_info'
        " offset 5m > bool 1e3 and max without (job) (c_gauge @ start()) unless d_total[5m:1m]"
    )

    assert promql_metric_names(expr) == {"a_seconds_bucket", "target_info", "c_gauge", "d_total"}


def test_series_names_map_back_to_their_histogram() -> None:
    histogram = next(iter(HISTOGRAMS))
    expr = f"sum(rate({histogram}_count[1m])) / sum(rate({histogram}_sum[1m]))"

    assert promql_metric_names(expr) == {histogram}
    # Not an exported histogram: kept as written, so the check reports it.
    assert promql_metric_names("loan_engine_pipeline_runs_total_count") == {
        "loan_engine_pipeline_runs_total_count"
    }


def test_dashboard_variable_queries_count_their_metric_only() -> None:
    dashboard = {
        "templating": {
            "list": [
                {"name": "r", "type": "query", "query": "label_values(x_total{a='b'}, route)"},
                {"name": "s", "type": "query", "query": {"query": "query_result(max(y_gauge))"}},
                {"name": "t", "type": "query", "query": "label_values(instance)"},
                {"name": "u", "type": "query", "query": "metrics(loan_engine_.*)"},
                {"name": "v", "type": "textbox", "query": "not_a_metric"},
            ]
        }
    }

    assert dashboard_metric_names(dashboard) == {"x_total", "y_gauge"}


def test_text_names_in_both_forms_and_loosely_named_in_prose() -> None:
    otel_name, prom_name = next(iter(INSTRUMENTS.items()))
    text = (
        f"The `{otel_name}` histogram, `{prom_name}_bucket` in Prometheus; the database is\n"
        "`sqlite:///./var/loan_engine.db`, the log event `http.request.completed`; the\n"
        "`ratelimit.storage.errors` metric; metric `lonely_name`.\n"
        "metric_name_selectors: ['^loan_engine\\.pipeline\\.runs$', '^http_server_x$']\n"
    )

    assert text_metric_names(text, markdown=True) == {
        prom_name,
        "ratelimit_storage_errors",
        "lonely_name",
        "loan_engine_pipeline_runs_total",
        "http_server_x",
    }
    assert text_metric_names(text, markdown=False) == {
        prom_name,
        "loan_engine_pipeline_runs_total",
        "http_server_x",
    }


# --- Grafana ------------------------------------------------------------------------


def test_dashboards_are_valid_json_with_unique_uids_and_panel_ids() -> None:
    assert DASHBOARDS
    uids = []
    for path in DASHBOARDS:
        dashboard = load_json(path)
        uids.append(dashboard["uid"])
        assert dashboard["title"]
        ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for title, target in prometheus_targets(dashboard):
            assert target.get("expr", "").strip(), title
    assert len(uids) == len(set(uids))


def test_provisioning_is_valid_yaml_and_dashboards_use_provisioned_datasources() -> None:
    assert PROVISIONING
    for path in PROVISIONING:
        assert load_yaml(path)["apiVersion"] == 1, path.name
    datasources = provisioned_datasources()

    for path in DASHBOARDS:
        for node in re.findall(r'"uid":\s*"([^"]+)"', path.read_text(encoding="utf-8")):
            assert node in datasources or node in {"-- Grafana --", load_json(path)["uid"]}


def test_exemplars_link_to_the_jaeger_datasource_by_trace_id() -> None:
    datasources = provisioned_datasources()
    prometheus = next(s for s in datasources.values() if s["type"] == "prometheus")
    jaeger = next(s for s in datasources.values() if s["type"] == "jaeger")

    assert jaeger["url"] == "http://jaeger:16686"
    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": jaeger["uid"]}
    ]
    latency = [
        target
        for path in DASHBOARDS
        for title, target in prometheus_targets(load_json(path))
        if "http_server_request_duration_seconds_bucket" in target["expr"]
    ]
    assert latency
    assert all(target["exemplar"] is True for target in latency)


def test_dashboard_provider_reads_the_folder_compose_mounts() -> None:
    providers = [
        provider for path in PROVISIONING for provider in load_yaml(path).get("providers", [])
    ]
    volumes = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]

    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]
    assert "./observability/grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes


# --- Prometheus, collector, compose ---------------------------------------------------


def test_prometheus_scrapes_the_collectors_exporter_keeping_its_labels() -> None:
    collector = load_yaml(COLLECTOR_DEV)
    exporter = collector["exporters"]["prometheus"]
    metrics = collector["service"]["pipelines"]["metrics"]
    (job,) = load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]

    assert metrics["receivers"] == ["otlp"]
    assert metrics["exporters"] == ["prometheus"]
    assert exporter["enable_open_metrics"] is True
    assert collector["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]
    port = exporter["endpoint"].rsplit(":", 1)[1]
    assert job["static_configs"][0]["targets"] == [f"otel-collector:{port}"]
    assert job["honor_labels"] is True


def test_compose_services_are_pinned_local_healthchecked_and_mount_existing_files() -> None:
    services = load_yaml(COMPOSE)["services"]

    assert {"jaeger", "otel-collector", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        image, _, tag = service["image"].rpartition(":")
        assert image and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), name
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"], name
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert (REPO_ROOT / source).exists(), (name, source)
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query, Grafana variables filled in, passes `promtool check rules`."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make check-observability` installs it"
    rules = []
    for path in DASHBOARDS:
        for index, (_, target) in enumerate(prometheus_targets(load_json(path))):
            expr = re.sub(r"\$__(?:rate_interval|interval|range)\b", "5m", target["expr"])
            expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
            record = f"dashboard:{path.stem.replace('-', '_')}:{index}"
            rules.append({"record": record, "expr": expr})
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))

    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


@pytest.mark.parametrize("path", [COLLECTOR_DEV, REPO_ROOT / "otel-collector" / "config.aws.yaml"])
def test_collector_configs_are_valid_yaml_with_a_metrics_pipeline(path: Path) -> None:
    pipelines = load_yaml(path)["service"]["pipelines"]

    assert pipelines["metrics"]["receivers"] == ["otlp"]
