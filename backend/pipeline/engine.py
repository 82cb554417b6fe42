"""Run the seven phases over one tape, batch by batch, timing and tracing each phase.

Each phase has one span for the whole run, current around every call into the
phase (see `backend.pipeline.telemetry` for why one span per phase, not per batch).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from backend.config import Settings
from backend.database import Database
from backend.errors import AppError
from backend.pipeline.phases import default_phases
from backend.pipeline.phases.base import Batch, Phase, PipelineFailure, RunContext, RunCounts
from backend.pipeline.telemetry import PhaseSpan, record_error
from backend.storage import Storage

logger = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RunResult:
    counts: RunCounts
    durations: dict[str, float]


class PipelineEngine:
    """Executes one run. Raises `PipelineFailure` with a message safe to show users;
    anything else that escapes is a bug, reported by the runner as an internal error."""

    def __init__(
        self,
        database: Database,
        storage: Storage,
        settings: Settings,
        phases: Callable[[], list[Phase]] = default_phases,
    ) -> None:
        self.database = database
        self.storage = storage
        self.settings = settings
        self.phases = phases

    @staticmethod
    def output_prefix(run_id: uuid.UUID) -> str:
        return f"outputs/{run_id}/"

    async def execute(self, run_id: uuid.UUID, input_path: str) -> RunResult:
        ctx = RunContext(
            run_id=run_id,
            input_path=input_path,
            output_prefix=self.output_prefix(run_id),
            settings=self.settings,
            storage=self.storage,
            database=self.database,
        )
        phases = self.phases()
        durations = ctx.durations
        for phase in phases:
            durations[phase.name] = 0.0

        spans: dict[str, PhaseSpan] = {}

        async def timed(phase: Phase, step: Awaitable[None]) -> None:
            began = time.perf_counter()
            phase_span = spans[phase.name]
            with phase_span.attached() as span:
                try:
                    await step
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

        started: list[Phase] = []
        try:
            for phase in phases:
                spans[phase.name] = PhaseSpan(phase.name)
                started.append(phase)
                await timed(phase, phase.start(ctx))
            index = 0
            while not ctx.exhausted:
                batch = Batch(index=index)
                for phase in phases:
                    rows_in, exceptions_in = size(batch), len(batch.exceptions)
                    await timed(phase, phase.process(batch, ctx))
                    spans[phase.name].count(
                        rows_in, size(batch), len(batch.exceptions) - exceptions_in
                    )
                logger.debug(
                    "pipeline.batch.completed",
                    batch=index,
                    rows=len(batch.rows),
                    total=ctx.counts.total,
                )
                index += 1
            for phase in phases:
                await timed(phase, phase.finish(ctx))
                spans[phase.name].end(durations[phase.name])
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
        return RunResult(
            counts=ctx.counts, durations={k: round(v, 4) for k, v in durations.items()}
        )
