"""Traces of pipeline runs: one trace per run, one span per phase, none per row.

The trace of a run:

    pipeline.run                    root of a NEW trace; links to the POST's server span
                                    (and, on a worker, to the message's consumer span)
      pipeline.queue.wait           from queued to claimed (the root starts with it)
      SELECT/UPDATE ...             the executor's status writes (claim, completed, failed)
      pipeline.phase.ingest
      pipeline.phase.validate
      pipeline.phase.normalize
      pipeline.phase.enrich
      pipeline.phase.eligibility
      pipeline.phase.persist
        BEGIN / COPY loan_facts ... / COMMIT     the statements the phase issued
      pipeline.phase.report

The request that queues a run ends at 202, long before the run does, so the
run is not its child: the run's root span carries a link to the request's
server span, and the request span carries `pipeline.run_id` and
`pipeline.run.trace_id` for the way back.

Phase spans and batches. The engine interleaves the phases: every phase
starts, then each batch goes through all seven, then every phase finishes. A
phase's work is therefore not one contiguous stretch, and one span per call
would mean a span per phase per batch. Instead each phase has ONE span for the
run (`PhaseSpan`), opened just before its `start` and ended after its `finish`
(or `abort`); each call into the phase runs with that span made current
(an OpenTelemetry context attach/detach, per phase per batch, on the event
loop or in the worker thread that runs the phase's `transform`), so whatever
the phase emits (SQL spans, log lines, tasks it creates such as persist's
COPY) lands under it. Phase spans thus overlap in time, each covering its phase's
stretch from start to finish; the time the phase actually worked is
`pipeline.phase.busy_seconds`. A run makes 1 + 7 spans plus one per statement:
no span per batch, none per row.

Errors: the span of the failing phase and the run span get status ERROR. The
exception is recorded with its message and traceback passed through the log
redaction (credentials in URLs and DSNs); the status description is the
run's user-safe message, or the exception type for an internal error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    format_span_id,
    format_trace_id,
)

from backend.config import Settings
from backend.observability.redaction import record_exception
from backend.observability.trace_ids import new_trace_context, plan_trace_id, trace_url

tracer = trace.get_tracer("backend.pipeline")


@dataclass(frozen=True, slots=True)
class RunTraceSeed:
    """What a run's trace starts from, captured when the run is queued.

    `trace_id` is the id the run's trace will have (None when it cannot be
    chosen in advance); `link` is the span context of the request that queued it.
    """

    trace_id: int | None
    link: SpanContext | None

    @property
    def trace_id_hex(self) -> str | None:
        return format_trace_id(self.trace_id) if self.trace_id is not None else None

    @property
    def traceparent(self) -> str | None:
        """The linked span as a W3C traceparent, to keep with the run; None without one."""
        if self.link is None:
            return None
        return (
            f"00-{format_trace_id(self.link.trace_id)}-{format_span_id(self.link.span_id)}-"
            f"{int(self.link.trace_flags):02x}"
        )

    @classmethod
    def stored(cls, trace_id: str | None, traceparent: str | None) -> RunTraceSeed:
        """The seed of a run as its row keeps it (`trace_id`, `request_traceparent`)."""
        planned: int | None = None
        if trace_id:
            try:
                planned = int(trace_id, 16) or None
            except ValueError:
                planned = None
        return cls(planned, parse_traceparent(traceparent) if traceparent else None)


def parse_traceparent(value: str) -> SpanContext | None:
    """The span context of a W3C traceparent `00-<32 hex>-<16 hex>-<2 hex>`, or None."""
    parts = value.strip().split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 0xFF))


def seed_from_request() -> RunTraceSeed:
    """Plan the run's trace id and capture the current (request) span to link to."""
    span_context = trace.get_current_span().get_span_context()
    return RunTraceSeed(plan_trace_id(), span_context if span_context.is_valid else None)


def mark_request(run_id: uuid.UUID, seed: RunTraceSeed) -> None:
    """Name the queued run on the current (request) span, so its trace leads to the run."""
    span = trace.get_current_span()
    span.set_attribute("pipeline.run_id", str(run_id))
    if seed.trace_id_hex is not None:
        span.set_attribute("pipeline.run.trace_id", seed.trace_id_hex)


def run_trace_url(settings: Settings, trace_id: str | None) -> str | None:
    """Where to open a run's trace (Jaeger or X-Ray, per TRACE_UI); None without one."""
    return trace_url(settings, trace_id) if trace_id else None


def record_error(span: Span, exc: BaseException, description: str | None = None) -> None:
    """Mark `span` as failed by `exc`: status ERROR and an exception event.

    The event's message and traceback go through the log redaction first; the
    description defaults to the exception type, never its message.
    """
    record_exception(span, exc)
    span.set_status(Status(StatusCode.ERROR, description or type(exc).__name__))


@contextmanager
def run_span(
    run_id: uuid.UUID,
    seed: RunTraceSeed | None,
    *,
    attempt: int = 1,
    queued_at: datetime | None = None,
    claimed_at: datetime | None = None,
    links: list[SpanContext] | None = None,
) -> Iterator[Span]:
    """Start the root span `pipeline.run` of one execution of a run and make it current.

    The span belongs to the run's trace (`seed.trace_id` when planned) and
    links to the request that queued the run (`seed.link`) and to `links`
    (e.g. the message that delivered it). With `queued_at`, the span starts
    when the run entered the queue and its first child, `pipeline.queue.wait`,
    covers the wait until `claimed_at`. The span is current in a context of its
    own: nothing of the caller's context (a request or task span, baggage)
    carries into the run.
    """
    span_links = [Link(seed.link)] if seed is not None and seed.link is not None else []
    span_links += [Link(context) for context in links or () if context.is_valid]
    planned = seed.trace_id if seed is not None else None
    claimed_ns = _ns(claimed_at) if claimed_at is not None else time.time_ns()
    # Clocks of the queuing and the executing host may differ: never start after the claim.
    queued_ns = min(_ns(queued_at), claimed_ns) if queued_at is not None else None
    token = otel_context.attach(new_trace_context(planned))
    try:
        span = tracer.start_span(
            "pipeline.run",
            kind=SpanKind.INTERNAL,
            links=span_links,
            attributes={"pipeline.run_id": str(run_id), "pipeline.attempt": attempt},
            start_time=queued_ns,
        )
    finally:
        otel_context.detach(token)
    run_context = trace.set_span_in_context(span, otel_context.Context())
    if queued_ns is not None:
        wait_seconds = round((claimed_ns - queued_ns) / 1e9, 6)
        span.set_attribute("pipeline.queue.wait_seconds", wait_seconds)
        wait = tracer.start_span(
            "pipeline.queue.wait",
            context=run_context,
            start_time=queued_ns,
            attributes={"pipeline.queue.wait_seconds": wait_seconds},
        )
        wait.end(end_time=claimed_ns)
    token = otel_context.attach(run_context)
    try:
        yield span
    finally:
        otel_context.detach(token)
        span.end()


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1e9)


def set_run_outcome(span: Span, status: str, counts: dict[str, int] | None = None) -> None:
    """The run's final status and loan counts on its root span."""
    span.set_attribute("pipeline.status", status)
    for key, value in (counts or {}).items():
        span.set_attribute(f"pipeline.loans.{key}", value)


class PhaseSpan:
    """The one span of one phase for one run, and what the phase did across batches.

    `attached()` makes the span current around each call into the phase; `count`
    adds one batch's rows in/out and exceptions; `end` writes the totals.
    """

    __slots__ = ("_context", "batches", "ended", "exceptions", "rows_in", "rows_out", "span")

    def __init__(self, name: str) -> None:
        # A child of the current span: the run's root span.
        self.span = tracer.start_span(f"pipeline.phase.{name}", attributes={"pipeline.phase": name})
        self._context = trace.set_span_in_context(self.span)
        self.rows_in = 0
        self.rows_out = 0
        self.exceptions = 0
        self.batches = 0
        self.ended = False

    @contextmanager
    def attached(self) -> Iterator[Span]:
        token = otel_context.attach(self._context)
        try:
            yield self.span
        finally:
            otel_context.detach(token)

    def count(self, rows_in: int, rows_out: int, exceptions: int) -> None:
        self.batches += 1
        self.rows_in += rows_in
        self.rows_out += rows_out
        self.exceptions += exceptions

    def end(self, busy_seconds: float, *, aborted: bool = False) -> None:
        """Write the totals and end the span; a second call does nothing."""
        if self.ended:
            return
        self.ended = True
        attributes: dict[str, Any] = {
            "pipeline.phase.rows_in": self.rows_in,
            "pipeline.phase.rows_out": self.rows_out,
            "pipeline.phase.exceptions": self.exceptions,
            "pipeline.phase.batches": self.batches,
            "pipeline.phase.busy_seconds": round(busy_seconds, 4),
        }
        if aborted:
            attributes["pipeline.phase.aborted"] = True
        self.span.set_attributes(attributes)
        self.span.end()


@contextmanager
def db_span(system: str, operation: str, statement: str, **attributes: Any) -> Iterator[Span]:
    """A client span for a statement SQLAlchemy does not see (COPY, raw transactions).

    Named and attributed like the SQLAlchemy instrumentation's spans, so a
    trace shows them alike; a failure marks it through `record_error`.
    """
    with tracer.start_as_current_span(
        operation,
        kind=SpanKind.CLIENT,
        attributes={
            "db.system": system,
            "db.operation": operation.split()[0],
            "db.statement": statement,
            **attributes,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            record_error(span, exc)
            raise
