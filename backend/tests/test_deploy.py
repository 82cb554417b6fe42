"""The AWS deployment, read statically: deploy/aws/stack.yaml (CloudFormation), the
entrypoint and the collector configs.

Checks the timing budget between the ALB, ECS and the app's shutdown settings (values
taken from the task definitions' environment, falling back to the app's defaults), the
telemetry wiring of each task (ADOT sidecar, OTEL_* variables), that no secret travels in
plain environment, that the collector config in SSM is the file in the repository, and
that every Logs Insights query in the README is saved in the stack.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from backend.config import Settings

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "aws" / "stack.yaml"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
COLLECTOR_AWS = ROOT / "otel-collector" / "config.aws.yaml"
COLLECTOR_DEV = ROOT / "otel-collector" / "config.dev.yaml"
ADOT_IMAGE = re.compile(r"public\.ecr\.aws/aws-observability/aws-otel-collector:v\d+\.\d+\.\d+")
FARGATE_MAX_STOP_TIMEOUT = 120
SSM_STANDARD_MAX_CHARS = 4096
SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|TOKEN|KEY|CREDENTIAL|DATABASE_URL|BROKER_URL|STORAGE_URL"
)
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def load_stack() -> dict[str, Any]:
    """The template with CloudFormation's tags (!Ref, !Sub, !GetAtt) as intrinsic dicts."""
    from cfnlint.decode import decode

    template, problems = decode(str(STACK))
    assert not problems, [str(problem) for problem in problems]
    assert isinstance(template, dict)
    return template


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return load_stack()


def resources(stack: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {
        name: resource["Properties"]
        for name, resource in stack["Resources"].items()
        if resource["Type"] == kind
    }


def containers(stack: dict[str, Any], family: str) -> dict[str, dict[str, Any]]:
    (task,) = (
        task
        for task in resources(stack, "AWS::ECS::TaskDefinition").values()
        if task["Family"] == family
    )
    return {container["Name"]: container for container in task["ContainerDefinitions"]}


def environment(container: dict[str, Any]) -> dict[str, Any]:
    return {item["Name"]: item["Value"] for item in container.get("Environment", [])}


def setting(container: dict[str, Any], name: str) -> float:
    """A numeric setting as the container gets it: its environment, else the app's default."""
    value = environment(container).get(name)
    if value is None:
        value = Settings.model_fields[name].default
    return float(value)


def target_group(stack: dict[str, Any]) -> dict[str, Any]:
    (group,) = resources(stack, "AWS::ElasticLoadBalancingV2::TargetGroup").values()
    return group


def attributes(items: list[dict[str, Any]]) -> dict[str, str]:
    return {item["Key"]: str(item["Value"]) for item in items}


def entrypoint_default(name: str) -> float:
    match = re.search(rf'^{name}="\$\{{{name}:-([0-9.]+)\}}"$', ENTRYPOINT.read_text(), re.M)
    assert match, f"{name} has no default in the entrypoint"
    return float(match.group(1))


def app_container(stack: dict[str, Any], family: str) -> dict[str, Any]:
    return next(c for name, c in containers(stack, family).items() if name != "otel-collector")


# --- timing budget ---------------------------------------------------------------------


def test_target_group_health_check_outlasts_the_apps_own_timeout(stack: dict[str, Any]) -> None:
    group = target_group(stack)
    api = containers(stack, "loan-engine-api")["api"]

    assert group["HealthCheckPath"] == "/health/ready"
    assert group["HealthCheckTimeoutSeconds"] > setting(api, "HEALTH_CHECK_TIMEOUT")
    assert group["HealthCheckIntervalSeconds"] > group["HealthCheckTimeoutSeconds"]
    assert 2 <= group["HealthyThresholdCount"] <= 3
    assert 2 <= group["UnhealthyThresholdCount"] <= 3


def test_deregistration_delay_covers_the_drain(stack: dict[str, Any]) -> None:
    api = containers(stack, "loan-engine-api")["api"]
    delay = float(
        attributes(target_group(stack)["TargetGroupAttributes"])[
            "deregistration_delay.timeout_seconds"
        ]
    )

    drain = setting(api, "SHUTDOWN_DRAIN_DELAY_SECONDS") + setting(api, "SHUTDOWN_GRACE_SECONDS")
    assert drain > 0
    assert delay >= drain


def test_stop_timeouts_cover_the_apps_grace(stack: dict[str, Any]) -> None:
    api = containers(stack, "loan-engine-api")["api"]
    worker = containers(stack, "loan-engine-worker")["worker"]

    api_budget = (
        setting(api, "SHUTDOWN_DRAIN_DELAY_SECONDS")
        + setting(api, "SHUTDOWN_GRACE_SECONDS")
        + setting(api, "PIPELINE_DRAIN_SECONDS")
    )
    assert api_budget + 5 < api["StopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT
    assert setting(worker, "PIPELINE_DRAIN_SECONDS") < worker["StopTimeout"]
    assert worker["StopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT


def test_uvicorn_keeps_idle_connections_longer_than_the_alb(stack: dict[str, Any]) -> None:
    (balancer,) = resources(stack, "AWS::ElasticLoadBalancingV2::LoadBalancer").values()
    idle = float(attributes(balancer["LoadBalancerAttributes"])["idle_timeout.timeout_seconds"])
    api_env = environment(containers(stack, "loan-engine-api")["api"])
    keep_alive = float(api_env.get("KEEP_ALIVE_SECONDS", entrypoint_default("KEEP_ALIVE_SECONDS")))

    assert idle == 60
    assert keep_alive > idle
    assert entrypoint_default("KEEP_ALIVE_SECONDS") > idle
    # The app's own request timeout answers before the ALB gives up on the target.
    assert Settings.model_fields["REQUEST_TIMEOUT_SECONDS"].default < idle


def test_start_up_fits_the_health_check_grace_period(stack: dict[str, Any]) -> None:
    api_service = next(
        service
        for service in resources(stack, "AWS::ECS::Service").values()
        if service.get("LoadBalancers")
    )
    api_env = environment(containers(stack, "loan-engine-api")["api"])
    grace = api_service["HealthCheckGracePeriodSeconds"]

    migrations = api_env.get("RUN_MIGRATIONS", "true") == "true"
    budget = 30.0  # seed the admin, start uvicorn, two healthy checks
    if migrations:
        budget += float(
            api_env.get(
                "MIGRATION_TIMEOUT_SECONDS", entrypoint_default("MIGRATION_TIMEOUT_SECONDS")
            )
        )
    assert grace >= budget


def test_services_roll_back_a_failed_deployment(stack: dict[str, Any]) -> None:
    services = resources(stack, "AWS::ECS::Service")

    assert len(services) == 2
    for service in services.values():
        breaker = service["DeploymentConfiguration"]["DeploymentCircuitBreaker"]
        assert breaker == {"Enable": True, "Rollback": True}
        assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == (
            "DISABLED"
        )


# --- tasks -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["loan-engine-api", "loan-engine-worker"])
def test_tasks_carry_the_collector_sidecar_and_wait_for_it(
    stack: dict[str, Any], family: str
) -> None:
    found = containers(stack, family)
    sidecar = found["otel-collector"]
    app = app_container(stack, family)

    assert ADOT_IMAGE.fullmatch(sidecar["Image"]), sidecar["Image"]
    assert {"Name": "AOT_CONFIG_CONTENT", "ValueFrom": {"Ref": "CollectorConfig"}} in sidecar[
        "Secrets"
    ]
    assert sidecar["HealthCheck"]["Command"]
    assert {"ContainerName": "otel-collector", "Condition": "HEALTHY"} in app["DependsOn"]
    for container in found.values():
        assert container["Memory"] > 0, container["Name"]
        assert container["LogConfiguration"]["LogDriver"] == "awslogs"


@pytest.mark.parametrize("family", ["loan-engine-api", "loan-engine-worker"])
def test_tasks_export_telemetry_to_the_sidecar(stack: dict[str, Any], family: str) -> None:
    app = app_container(stack, family)
    env = environment(app)
    log_group = app["LogConfiguration"]["Options"]["awslogs-group"]

    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://localhost:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"]
    assert env["TRACE_UI"] == "xray"
    assert env["AWS_REGION"] == {"Ref": "AWS::Region"}
    assert env["PIPELINE_EXECUTOR"] == "celery"
    assert env["ENVIRONMENT"] == "production"
    # X-Ray links a trace to the app's log group (not the sidecar's).
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == {
        "Fn::Sub": "aws.log.group.names=${" + log_group["Ref"] + "}"
    }
    secrets = {item["Name"] for item in app["Secrets"]}
    assert {"DATABASE_URL", "SECRET_KEY", "CELERY_BROKER_URL"} <= secrets


def test_the_api_gets_its_secrets_and_probes_liveness(stack: dict[str, Any]) -> None:
    api = containers(stack, "loan-engine-api")["api"]

    assert {"ADMIN_PASSWORD", "RATE_LIMIT_STORAGE_URL"} <= {s["Name"] for s in api["Secrets"]}
    assert "/health/live" in " ".join(api["HealthCheck"]["Command"])
    assert api["PortMappings"] == [{"ContainerPort": 8000, "Protocol": "tcp"}]


def test_the_worker_runs_celery_and_migrations_are_a_one_off_task(stack: dict[str, Any]) -> None:
    worker = containers(stack, "loan-engine-worker")["worker"]
    (migrate,) = containers(stack, "loan-engine-migrate").values()

    assert worker["Command"][:4] == ["celery", "-A", "backend.worker", "worker"]
    assert migrate["Command"] == ["python", "-m", "backend.admin.cli", "migrate"]
    for family in ("loan-engine-api", "loan-engine-worker", "loan-engine-migrate"):
        # Several tasks starting at once must not race on the schema.
        assert environment(app_container(stack, family))["RUN_MIGRATIONS"] == "false"


def _every_container(stack: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for task in resources(stack, "AWS::ECS::TaskDefinition").values():
        yield from task["ContainerDefinitions"]


def test_no_secret_in_plain_environment(stack: dict[str, Any]) -> None:
    for container in _every_container(stack):
        for name, value in environment(container).items():
            assert not SECRET_NAME.search(name), (container["Name"], name)
            assert not CREDENTIALS_IN_URL.search(str(value)), (container["Name"], name)
        for secret in container.get("Secrets", []):
            assert isinstance(secret["ValueFrom"], dict), secret  # a parameter, never a literal


def test_the_task_role_is_limited_to_telemetry_and_the_tape_bucket(stack: dict[str, Any]) -> None:
    role = stack["Resources"]["TaskRole"]["Properties"]
    statements = [s for policy in role["Policies"] for s in policy["PolicyDocument"]["Statement"]]

    def actions(statement: dict[str, Any]) -> list[str]:
        action = statement["Action"]
        return [action] if isinstance(action, str) else list(action)

    every = {action for statement in statements for action in actions(statement)}
    assert "ManagedPolicyArns" not in role
    assert {action.split(":")[0] for action in every} == {"xray", "cloudwatch", "logs", "s3"}
    assert not any(action.endswith("*") for action in every)
    (metric_data,) = (s for s in statements if actions(s) == ["cloudwatch:PutMetricData"])
    assert metric_data["Condition"] == {"StringEquals": {"cloudwatch:namespace": "LoanEngine"}}
    for statement in statements:
        if any(action.startswith("s3:") for action in actions(statement)):
            assert "${TapeBucketName}" in statement["Resource"]["Fn::Sub"]
        if any(action.startswith("logs:") for action in actions(statement)):
            assert {"Fn::GetAtt": ["MetricsLogGroup", "Arn"]} in statement["Resource"]


# --- collector config ----------------------------------------------------------------------


def test_the_ssm_collector_config_is_the_repository_file(stack: dict[str, Any]) -> None:
    parameter = stack["Resources"]["CollectorConfig"]["Properties"]
    text = COLLECTOR_AWS.read_text(encoding="utf-8")

    assert str(parameter["Value"]) == text
    assert parameter["Tier"] != "Standard" or len(text) <= SSM_STANDARD_MAX_CHARS


@pytest.mark.parametrize("path", [COLLECTOR_AWS, COLLECTOR_DEV], ids=lambda p: p.name)
def test_collector_pipelines_use_exactly_the_defined_components(path: Path) -> None:
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    service = config["service"]

    for kind in ("receivers", "processors", "exporters"):
        defined = set(config.get(kind) or {})
        used = {
            name for pipeline in service["pipelines"].values() for name in pipeline.get(kind, [])
        }
        assert used <= defined, (kind, used - defined)
        assert defined <= used, (kind, defined - used)
    assert set(service.get("extensions", [])) == set(config.get("extensions") or {})


def test_the_aws_collector_detects_ecs_and_indexes_the_apps_attributes() -> None:
    config = yaml.safe_load(COLLECTOR_AWS.read_text(encoding="utf-8"))
    sources = "\n".join(
        (ROOT / name).read_text(encoding="utf-8")
        for name in (
            "backend/pipeline/telemetry.py",
            "backend/api/dependencies.py",
            "backend/middleware/request_context.py",
        )
    )
    set_on_spans = set(re.findall(r'set_attribute\(\s*"([^"]+)"', sources))

    assert config["processors"]["resourcedetection"]["detectors"] == ["env", "ecs"]
    indexed = config["exporters"]["awsxray"]["indexed_attributes"]
    assert {"pipeline.run_id", "enduser.id"} <= set(indexed)
    assert set(indexed) - {"http.route"} <= set_on_spans  # http.route: the instrumentation's
    assert "health_check" in config["extensions"]


def test_emf_alarms_use_declared_metrics_and_dimensions(stack: dict[str, Any]) -> None:
    """An alarm on an EMF metric matches only when its dimension set is one the collector
    declares for that metric (NoDimensionRollup: no other sets exist)."""
    emf = yaml.safe_load(COLLECTOR_AWS.read_text(encoding="utf-8"))["exporters"]["awsemf"]
    assert emf["dimension_rollup_option"] == "NoDimensionRollup"
    alarms = [
        alarm
        for alarm in resources(stack, "AWS::CloudWatch::Alarm").values()
        if alarm.get("Namespace") == emf["namespace"]
    ]
    assert {alarm["MetricName"] for alarm in alarms} >= {
        "loan_engine.pipeline.runs",
        "loan_engine.pipeline.queue.depth",
    }
    for alarm in alarms:
        dimensions = sorted(d["Name"] for d in alarm["Dimensions"])
        declared = [
            sorted(dimension_set)
            for declaration in emf["metric_declarations"]
            if any(
                re.fullmatch(s, alarm["MetricName"]) for s in declaration["metric_name_selectors"]
            )
            for dimension_set in declaration["dimensions"]
        ]
        assert dimensions in declared, (alarm["MetricName"], dimensions, declared)


def test_alb_alarms_cover_errors_latency_and_health(stack: dict[str, Any]) -> None:
    alarms = list(resources(stack, "AWS::CloudWatch::Alarm").values())
    metric_names = {alarm.get("MetricName") for alarm in alarms} | {
        query["MetricStat"]["Metric"]["MetricName"]
        for alarm in alarms
        for query in alarm.get("Metrics", [])
        if "MetricStat" in query
    }

    assert {"HTTPCode_Target_5XX_Count", "RequestCount", "TargetResponseTime"} <= metric_names
    assert "UnHealthyHostCount" in metric_names
    assert any(alarm.get("ExtendedStatistic") == "p99" for alarm in alarms)


# --- saved queries and X-Ray -------------------------------------------------------------


def readme_queries() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### CloudWatch Logs Insights", 1)[1]
    section = re.split(r"\n#{1,3} ", section, maxsplit=1)[0]
    return re.findall(r"```\n(.*?)\n```", section, re.S)


def test_every_readme_logs_insights_query_is_saved(stack: dict[str, Any]) -> None:
    saved = {
        str(query["QueryString"]): query
        for query in resources(stack, "AWS::Logs::QueryDefinition").values()
    }
    queries = readme_queries()

    assert len(queries) >= 8
    for text in queries:
        assert text in saved, text
        groups = saved[text]["LogGroupNames"]
        assert {"Ref": "ApiLogGroup"} in groups and {"Ref": "WorkerLogGroup"} in groups


def test_xray_group_filters_on_the_run_annotation(stack: dict[str, Any]) -> None:
    groups = resources(stack, "AWS::XRay::Group").values()
    indexed = yaml.safe_load(COLLECTOR_AWS.read_text(encoding="utf-8"))["exporters"]["awsxray"][
        "indexed_attributes"
    ]
    annotations = {name.replace(".", "_") for name in indexed}

    filters = [group["FilterExpression"] for group in groups]
    assert any("annotation.pipeline_run_id" in expression for expression in filters)
    for expression in filters:
        for used in re.findall(r"annotation\.(\w+)", expression):
            assert used in annotations, used


def test_log_groups_keep_a_retention(stack: dict[str, Any]) -> None:
    groups = resources(stack, "AWS::Logs::LogGroup")
    emf = yaml.safe_load(COLLECTOR_AWS.read_text(encoding="utf-8"))["exporters"]["awsemf"]

    assert len(groups) >= 4
    assert all(group["RetentionInDays"] for group in groups.values())
    assert emf["log_group_name"] in {group["LogGroupName"] for group in groups.values()}
