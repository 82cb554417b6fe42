"""The metrics the service exports, and every metric name the rest of the repository uses.

``EXPORTED_METRICS`` is the contract: the Prometheus names (as the OpenTelemetry
Prometheus exporters render them: unit suffix, ``_total`` on counters) of every
instrument the service creates. ``names_in_dashboards_and_docs()`` collects the metric
names the Grafana dashboards, the collector and Prometheus configs, the deployment
files and the README refer to, in the same Prometheus form, so a test can check that
each of them exists (and, given a scrape of ``/metrics``, that each is really served).

How a name is recognised, source by source:

- Dashboards (``observability/grafana/dashboards/*.json``): every PromQL ``expr`` and
  every query variable (``label_values(metric, label)``, ``query_result(expr)``) is
  read as PromQL; a metric name is an identifier that is not a function call, keyword,
  aggregation, label (inside ``{...}`` or a ``by (...)`` clause) or Grafana variable.
- Everything else (collector configs, Prometheus config, ``deploy/``, ``docs/``, the
  README): a Prometheus-form name (``loan_engine_...``, ``http_server_...``); an
  OpenTelemetry instrument name (``loan_engine.<a>.<b>...``, ``http.server.<a>...``,
  also written as a regex with ``\\.``), mapped through ``INSTRUMENTS``; and, in
  Markdown, any backticked name next to the word "metric" or "metrics" whatever it
  looks like, so a metric named loosely in prose is caught too.
- A series name ending in ``_bucket``, ``_sum`` or ``_count`` is reported as its
  histogram's name when that histogram is exported; any other name is reported as
  written (an OpenTelemetry name unknown to ``INSTRUMENTS`` with dots made
  underscores), so it fails the check against ``EXPORTED_METRICS``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]

#: OpenTelemetry instrument name -> Prometheus name, for every instrument the service creates.
INSTRUMENTS: Final[Mapping[str, str]] = {
    "http.server.request.duration": "http_server_request_duration_seconds",
    "http.server.active_requests": "http_server_active_requests",
    "loan_engine.pipeline.runs": "loan_engine_pipeline_runs_total",
    "loan_engine.pipeline.loans": "loan_engine_pipeline_loans_total",
    "loan_engine.pipeline.phase.duration": "loan_engine_pipeline_phase_duration_seconds",
    "loan_engine.pipeline.queue.depth": "loan_engine_pipeline_queue_depth",
    "loan_engine.pipeline.queue.wait": "loan_engine_pipeline_queue_wait_seconds",
    "loan_engine.pipeline.exceptions": "loan_engine_pipeline_exceptions_total",
    "loan_engine.ratelimit.decisions": "loan_engine_ratelimit_decisions_total",
    "loan_engine.ratelimit.storage.errors": "loan_engine_ratelimit_storage_errors_total",
    "loan_engine.db.pool.size": "loan_engine_db_pool_size",
    "loan_engine.db.pool.checked_out": "loan_engine_db_pool_checked_out",
    "loan_engine.db.pool.overflow": "loan_engine_db_pool_overflow",
    "loan_engine.db.pool.max": "loan_engine_db_pool_max",
    "loan_engine.db.slow_queries": "loan_engine_db_slow_queries_total",
    "loan_engine.spans.exported": "loan_engine_spans_exported_total",
    "loan_engine.spans.dropped": "loan_engine_spans_dropped_total",
    "loan_engine.circuit.state": "loan_engine_circuit_state",
}

#: Prometheus names of every exported metric (histograms by their base name).
EXPORTED_METRICS: Final[frozenset[str]] = frozenset(INSTRUMENTS.values())

#: The histograms among them: served as ``<name>_bucket``, ``<name>_sum``, ``<name>_count``.
HISTOGRAMS: Final[frozenset[str]] = frozenset(
    {
        "http_server_request_duration_seconds",
        "loan_engine_pipeline_phase_duration_seconds",
        "loan_engine_pipeline_queue_wait_seconds",
    }
)

HISTOGRAM_SUFFIXES: Final = ("_bucket", "_sum", "_count")

#: Files outside the dashboards that may name metrics, as globs from the repository root.
DOC_AND_CONFIG_GLOBS: Final = (
    "README.md",
    "docs/**/*.md",
    "deploy/**/*.md",
    "deploy/**/*.json",
    "deploy/**/*.yaml",
    "deploy/**/*.yml",
    "otel-collector/*.yaml",
    "observability/prometheus/*.yml",
)
DASHBOARD_GLOB: Final = "observability/grafana/dashboards/*.json"

_PROMETHEUS_FORM = re.compile(r"(?<![\w./-])(?:loan_engine|http_server)_[a-z0-9_]*[a-z0-9]\b")
# At least two segments after loan_engine (loan_engine.db is a file name, not a metric).
_OTEL_FORM = re.compile(
    r"(?<![\w./-])(?:loan_engine(?:\.[a-z0-9_]+){2,}|http\.server(?:\.[a-z0-9_]+)+)(?![\w.])"
)
_NEXT_TO_METRIC_WORD = re.compile(
    r"`([A-Za-z0-9_.:]+)`\s+metrics?\b|\bmetrics?\s+`([A-Za-z0-9_.:]+)`", re.IGNORECASE
)

# PromQL words that are not metric names when they stand alone (functions are recognised
# by the parenthesis that follows them).
_PROMQL_WORDS: Final = frozenset(
    {
        "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
        "group_left", "group_right", "inf", "nan", "atan2",
        "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk",
        "quantile", "count_values", "limitk", "limit_ratio",
    }
)  # fmt: skip
_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_PROMQL_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_PROMQL_TOKEN = re.compile(
    r"(?P<number>\d[\w.]*)|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?"
)
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")


def family_name(name: str) -> str:
    """The exported metric a series name belongs to (``x_bucket`` -> ``x`` for histograms)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def prometheus_name(name: str) -> str:
    """A metric name as written in a file, in Prometheus form (see the module docstring)."""
    name = name.replace("\\.", ".")
    if name in INSTRUMENTS:
        return INSTRUMENTS[name]
    return family_name(name.replace(".", "_"))


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects."""
    text = _GRAFANA_VARIABLE.sub(" ", expr)
    text = _PROMQL_STRING.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _PROMQL_GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _PROMQL_TOKEN.finditer(text):
        ident = match.group("ident")
        if ident is None or match.group("call") or ident.lower() in _PROMQL_WORDS:
            continue
        names.add(family_name(ident))
    return names


def _variable_query_metric_names(query: str) -> set[str]:
    """Metric names in a Grafana Prometheus variable query."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
    if label_values:
        return promql_metric_names(label_values.group(1))
    if re.fullmatch(r"\s*label_values\(\s*\w+\s*\)\s*", query):
        return set()  # a label name only
    if re.fullmatch(r"\s*(?:label_names|metrics)\(.*\)\s*", query, re.DOTALL):
        return set()  # matchers or a regex over names, not a name
    query_result = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.DOTALL)
    return promql_metric_names(query_result.group(1) if query_result else query)


def _walk(node: object) -> Iterator[dict[str, object]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def dashboard_metric_names(dashboard: object) -> set[str]:
    """Metric names in a Grafana dashboard (parsed JSON): panel queries and variables."""
    names: set[str] = set()
    for node in _walk(dashboard):
        expr = node.get("expr")
        if isinstance(expr, str):
            names |= promql_metric_names(expr)
        if node.get("type") == "query" and "name" in node:  # a template variable
            query = node.get("query")
            if isinstance(query, dict):
                query = query.get("query")
            if isinstance(query, str):
                names |= _variable_query_metric_names(query)
    return names


def text_metric_names(text: str, *, markdown: bool) -> set[str]:
    """Metric names in a document or config file (see the module docstring for the rules)."""
    text = text.replace("\\.", ".")
    found = set(_PROMETHEUS_FORM.findall(text)) | set(_OTEL_FORM.findall(text))
    if markdown:
        for match in _NEXT_TO_METRIC_WORD.finditer(text):
            found.add(match.group(1) or match.group(2))
    return {prometheus_name(name) for name in found}


def names_in_dashboards_and_docs() -> dict[str, set[str]]:
    """Metric names (Prometheus form) by file, relative to the repository root.

    Every dashboard is listed; other files only when they name at least one metric.
    """
    result: dict[str, set[str]] = {}
    for path in sorted(REPO_ROOT.glob(DASHBOARD_GLOB)):
        dashboard: object = json.loads(path.read_text(encoding="utf-8"))
        result[path.relative_to(REPO_ROOT).as_posix()] = dashboard_metric_names(dashboard)
    for pattern in DOC_AND_CONFIG_GLOBS:
        for path in sorted(REPO_ROOT.glob(pattern)):
            names = text_metric_names(
                path.read_text(encoding="utf-8"), markdown=path.suffix == ".md"
            )
            if names:
                result[path.relative_to(REPO_ROOT).as_posix()] = names
    return result
