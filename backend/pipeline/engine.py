"""Run the seven phases over one tape, batch by batch, timing and tracing each phase.

Each phase has one span for the whole run, current around every call into the
phase (see `backend.pipeline.telemetry` for why one span per phase, not per batch).

The run shares the event loop with the API, so the loop only waits: each
batch's CPU work (the phases' `transform`) runs in a worker thread, one hop
per stretch of phases with no I/O between them, and the I/O (`process`, and
`start`/`finish`/`abort`) runs on the loop. With the default phases a batch
takes two hops: validate, normalize, enrich, eligibility and persist's COPY
data; then report's lines, after persist has sent the batch; a third frees
the batch. bench/loop_stall.py measures what the loop still feels.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import structlog
from opentelemetry.trace import Span

from backend.config import Settings
from backend.database import Database
from backend.errors import AppError
from backend.observability import metrics as app_metrics
from backend.pipeline.phases import default_phases
from backend.pipeline.phases.base import (
    Batch,
    Phase,
    PipelineFailure,
    RunContext,
    RunCounts,
    does,
    off_loop,
)
from backend.pipeline.telemetry import PhaseSpan, record_error
from backend.storage import Storage

logger = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RunResult:
    counts: RunCounts
    durations: dict[str, float]


@dataclass(frozen=True, slots=True)
class PhaseProgress:
    """Where one phase of a run stands.

    So far, `rows_in` went into the phase, `rows_out` came out of it (ingest
    makes rows, validate drops rejected ones) and it raised `exceptions`; `bytes_read`
    is how much of the stored tape ingest has read by then (compressed bytes
    for a `.gz` tape), a measure of the whole run's progress. `finished` is
    set once, after the phase's `finish`.
    """

    phase: str
    rows_in: int
    rows_out: int
    exceptions: int
    bytes_read: int
    finished: bool = False


# Called on the event loop, after each batch (every phase) and after each phase's
# finish; it must return quickly and not raise (it would fail the run).
ProgressCallback = Callable[[PhaseProgress], None]


@dataclass(frozen=True)
class Stretch:
    """Consecutive phases a batch goes through with one worker-thread hop at most.

    `phases` run in order: the transforms of those in `transforming` in the
    worker thread (the hop), then `process` of the last one when `io` is set.
    """

    phases: tuple[Phase, ...]
    transforming: frozenset[str]
    io: Phase | None


def stretches(phases: Sequence[Phase]) -> list[Stretch]:
    """Cut `phases` after each one that does I/O per batch."""
    cut: list[Stretch] = []
    current: list[Phase] = []
    for phase in phases:
        current.append(phase)
        if does(phase, "process"):
            cut.append(_stretch(current, phase))
            current = []
    if current:
        cut.append(_stretch(current, None))
    return cut


def _stretch(phases: list[Phase], io: Phase | None) -> Stretch:
    transforming = frozenset(p.name for p in phases if does(p, "transform"))
    return Stretch(tuple(phases), transforming, io)


class PipelineEngine:
    """Executes one run. Raises `PipelineFailure` with a message safe to show users;
    anything else that escapes is a bug, reported by the runner as an internal error."""

    def __init__(
        self,
        database: Database,
        storage: Storage,
        settings: Settings,
        phases: Callable[[], list[Phase]] = default_phases,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.database = database
        self.storage = storage
        self.settings = settings
        self.phases = phases
        self.progress = progress

    @staticmethod
    def output_prefix(run_id: uuid.UUID) -> str:
        return f"outputs/{run_id}/"

    async def execute(
        self,
        run_id: uuid.UUID,
        input_path: str,
        *,
        owner: str | None = None,
        attempt: int = 1,
        output_prefix: str | None = None,
    ) -> RunResult:
        """Run every phase over the tape at `input_path`; `owner` (the lease holder)
        makes persist commit only while that owner still holds the run; `attempt` counts
        the executions of the run so far (this one included). Reports go under
        `output_prefix` (the run's own), by default `output_prefix(run_id)`."""
        ctx = RunContext(
            run_id=run_id,
            input_path=input_path,
            output_prefix=output_prefix or self.output_prefix(run_id),
            settings=self.settings,
            storage=self.storage,
            database=self.database,
            owner=owner,
            attempt=attempt,
        )
        phases = self.phases()
        durations = ctx.durations
        for phase in phases:
            durations[phase.name] = 0.0

        spans: dict[str, PhaseSpan] = {}

        @contextmanager
        def timed(phase: Phase) -> Iterator[Span]:
            """Around one call into `phase`, on the loop or in the worker thread: the
            phase's span is current, its time is added up, its errors recorded."""
            began = time.perf_counter()
            with spans[phase.name].attached() as span:
                try:
                    yield span
                except AppError as exc:
                    # Storage and other domain errors carry a client-safe message already.
                    failure = PipelineFailure(f"{phase.name}: {exc.message}")
                    record_error(span, exc, failure.message)
                    raise failure from exc
                except PipelineFailure as exc:
                    record_error(span, exc, exc.message)
                    raise
                except BaseException as exc:
                    record_error(span, exc)
                    raise
                finally:
                    durations[phase.name] += time.perf_counter() - began

        def size(batch: Batch) -> int:
            # Rows a batch carries: raw records until validate turns them into LoanRows.
            return len(batch.raw) + len(batch.rows)

        exception_rules: Counter[str] = Counter()

        def count(phase: Phase, arrived: tuple[int, int], batch: Batch) -> None:
            rows_in, exceptions_in = arrived
            spans[phase.name].count(rows_in, size(batch), len(batch.exceptions) - exceptions_in)
            exception_rules.update(e.rule_id for e in batch.exceptions[exceptions_in:])

        def run_transforms(stretch: Stretch, batch: Batch) -> tuple[int, int]:
            """The stretch's transforms, in phase order, each phase's batch counted once
            it is done. Returns what `stretch.io` got (rows, exceptions), for its count
            after its `process`."""
            arrived = (0, 0)
            for phase in stretch.phases:
                arrived = (size(batch), len(batch.exceptions))
                if phase.name in stretch.transforming:
                    with timed(phase):
                        phase.transform(batch, ctx)
                if phase is not stretch.io:
                    count(phase, arrived, batch)
            return arrived

        def report(phase: Phase, *, finished: bool = False) -> None:
            if self.progress is None:
                return
            phase_span = spans[phase.name]
            bytes_read = ctx.extra.get("bytes_read", 0)
            self.progress(
                PhaseProgress(
                    phase.name,
                    phase_span.rows_in,
                    phase_span.rows_out,
                    phase_span.exceptions,
                    bytes_read if isinstance(bytes_read, int) else 0,
                    finished,
                )
            )

        plan = stretches(phases)
        started: list[Phase] = []
        try:
            for phase in phases:
                spans[phase.name] = PhaseSpan(phase.name)
                started.append(phase)
                with timed(phase):
                    await phase.start(ctx)
            index = 0
            while not ctx.exhausted:
                batch = Batch(index=index)
                for stretch in plan:
                    if stretch.transforming:
                        arrived = await off_loop(partial(run_transforms, stretch, batch))
                    else:
                        arrived = run_transforms(stretch, batch)
                    if stretch.io is not None:
                        with timed(stretch.io):
                            await stretch.io.process(batch, ctx)
                        count(stretch.io, arrived, batch)
                for phase in phases:
                    report(phase)
                logger.debug(
                    "pipeline.batch.completed",
                    batch=index,
                    rows=len(batch.rows),
                    total=ctx.counts.total,
                )
                await off_loop(batch.clear)  # freeing thousands of objects is CPU work too
                index += 1
            for phase in phases:
                with timed(phase):
                    await phase.finish(ctx)
                spans[phase.name].end(durations[phase.name])
                app_metrics.phase_duration.record(durations[phase.name], {"phase": phase.name})
                report(phase, finished=True)
                logger.info(
                    "pipeline.phase.completed",
                    phase=phase.name,
                    seconds=round(durations[phase.name], 4),
                )
        except BaseException:
            for phase in reversed(started):
                phase_span = spans[phase.name]
                try:
                    if phase_span.ended:
                        await phase.abort(ctx)
                    else:
                        # Under the phase's span: a rollback is that phase's statement.
                        with phase_span.attached():
                            await phase.abort(ctx)
                except Exception as exc:
                    logger.warning(
                        "pipeline.phase.abort_failed",
                        phase=phase.name,
                        error_type=type(exc).__name__,
                    )
                finally:
                    phase_span.end(durations[phase.name], aborted=True)
            raise
        for rule, found in exception_rules.items():
            app_metrics.pipeline_exceptions.add(found, {"rule": rule})
        return RunResult(
            counts=ctx.counts, durations={k: round(v, 4) for k, v in durations.items()}
        )
