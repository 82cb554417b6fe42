"""Trace ids and their propagation: formats, X-Ray ids, the ALB Root, planned ids.

- Ids are written as W3C hex (`format_trace_id` / `format_span_id` of
  OpenTelemetry) or in the X-Ray form `1-<8 hex>-<24 hex>` of the same id.
- The ALB sends `X-Amzn-Trace-Id: Root=1-...` without a Parent. When a request
  has no other trace parent, its trace id becomes that Root, so ALB access
  logs, application logs and X-Ray share one id: `AlbRootPropagator` leaves the
  Root in the context and `AlbAwareIdGenerator` gives it to the server span.
- The same slot lets a caller choose the id of a new trace in advance
  (`plan_trace_id`, then `new_trace_context`).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.extension.aws.trace import AwsXRayIdGenerator
from opentelemetry.trace import format_trace_id

from backend.config import Settings

ALB_TRACE_HEADER = "x-amzn-trace-id"
# Context key under which the ALB propagator leaves a Root-only trace id.
_ALB_ROOT_KEY = otel_context.create_key("loan-engine.alb-root-trace-id")


def current_trace_id() -> str | None:
    """The 32-hex trace id of the current span, or None outside a (valid) span."""
    span_context = trace.get_current_span().get_span_context()
    return format_trace_id(span_context.trace_id) if span_context.is_valid else None


def xray_trace_id(trace_id: int | str) -> str:
    """The X-Ray form `1-<8 hex>-<24 hex>` of a W3C trace id (int or 32 hex chars)."""
    hex_id = format_trace_id(trace_id) if isinstance(trace_id, int) else trace_id.lower()
    return f"1-{hex_id[:8]}-{hex_id[8:]}"


def trace_id_from_xray(value: str) -> int | None:
    """The W3C trace id of an X-Ray id `1-<8 hex>-<24 hex>`, or None when malformed."""
    parts = value.strip().split("-")
    if len(parts) != 3 or parts[0] != "1" or len(parts[1]) != 8 or len(parts[2]) != 24:
        return None
    try:
        trace_id = int(parts[1] + parts[2], 16)
    except ValueError:
        return None
    return trace_id or None


def parse_amzn_trace_header(value: str) -> dict[str, str]:
    """`Self=...;Root=1-...;Parent=...;Sampled=1` as a dict (keys as sent)."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        key, sep, item = part.strip().partition("=")
        if sep and key:
            fields[key] = item
    return fields


def trace_url(settings: Settings, trace_id: str) -> str:
    """Where a person opens trace `trace_id` (32 hex): Jaeger or the X-Ray console."""
    if settings.TRACE_UI == "xray":
        region = settings.AWS_REGION
        return (
            f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}"
            f"#xray:traces/{xray_trace_id(trace_id)}"
        )
    return f"{settings.TRACE_UI_URL.rstrip('/')}/trace/{trace_id}"


class AlbRootPropagator(TextMapPropagator):
    """Adopt the ALB's Root-only `X-Amzn-Trace-Id` as the trace id of a new trace.

    Runs after the configured propagators: when they found a parent it does
    nothing; otherwise it leaves the Root in the context, where
    `AlbAwareIdGenerator` picks it up for the server span. It injects nothing.
    """

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        context = context if context is not None else Context()
        if trace.get_current_span(context).get_span_context().is_valid:
            return context
        values = getter.get(carrier, ALB_TRACE_HEADER)
        if not values:
            return context
        root = parse_amzn_trace_header(values[0]).get("Root")
        trace_id = trace_id_from_xray(root) if root else None
        if trace_id is None:
            return context
        return otel_context.set_value(_ALB_ROOT_KEY, trace_id, context)

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        return None

    @property
    def fields(self) -> set[str]:
        return set()


class AlbAwareIdGenerator(AwsXRayIdGenerator):
    """X-Ray ids (timestamp-prefixed, valid W3C), or the ALB Root for a request's new trace."""

    def generate_trace_id(self) -> int:
        # The ASGI middleware attaches the extracted context just before starting the
        # server span, so the Root is visible here only for that span: any later span
        # in the request has a valid current span and gets a fresh id or its parent's.
        root = otel_context.get_value(_ALB_ROOT_KEY)
        if isinstance(root, int) and not trace.get_current_span().get_span_context().is_valid:
            return root
        return super().generate_trace_id()


def plan_trace_id() -> int | None:
    """A fresh trace id that the next root span started by `new_trace_context` will take.

    None when the process provider does not use `AlbAwareIdGenerator` (another
    provider was installed first, or tracing is not started): the id cannot be
    chosen in advance then, and the caller reads it from the span once started.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(getattr(provider, "id_generator", None), AlbAwareIdGenerator):
        return None
    return AwsXRayIdGenerator().generate_trace_id()


def new_trace_context(trace_id: int | None = None) -> Context:
    """An empty context (no parent span, no baggage) for starting a NEW trace.

    Attach it while starting the root span: with `trace_id` (from `plan_trace_id`)
    the span takes that id, otherwise a fresh one. The id generator reads the
    attached context, not the one passed to `start_span`, hence "attach".
    """
    context = Context()
    if trace_id is None:
        return context
    # The same slot the ALB Root uses: "the trace id of the next root span here".
    return otel_context.set_value(_ALB_ROOT_KEY, trace_id, context)


def build_propagator(names: Iterable[str]) -> TextMapPropagator:
    """The composite of the named propagators (entry points), then the ALB Root one."""
    propagators: list[TextMapPropagator] = []
    for name in names:
        name = name.strip().lower()
        if not name or name == "none":
            continue
        found = entry_points(group="opentelemetry_propagator", name=name)
        if not found:
            raise ValueError(f"unknown OTEL_PROPAGATORS entry: {name!r}")
        propagators.append(next(iter(found)).load()())
    propagators.append(AlbRootPropagator())
    return CompositePropagator(propagators)
