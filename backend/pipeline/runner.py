"""Background execution of runs in this process, at most N at a time.

`submit` starts a task per run; a semaphore of PIPELINE_MAX_CONCURRENT_RUNS
slots decides which ones execute, the rest stay `queued`. The runner owns
every status change after `queued`: running, completed, failed, interrupted.

Each run is one trace of its own (`backend.pipeline.telemetry`): its task
starts the root span `pipeline.run`, linked to the request that queued it,
and every log line of the task carries `run_id` and the run's trace ids.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio
import structlog
from opentelemetry.trace import Span, Status, StatusCode
from sqlalchemy import delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from backend.config import Settings
from backend.database import Database
from backend.models import LoanException, LoanFact, PipelineRun, RunStatus
from backend.observability.metrics import MetricsCollector
from backend.pipeline.engine import PipelineEngine, RunResult
from backend.pipeline.phases.base import PipelineFailure
from backend.pipeline.telemetry import (
    RunTraceSeed,
    current_trace_id,
    record_error,
    run_span,
    set_run_outcome,
)
from backend.storage import Storage

logger = structlog.get_logger(__name__)

INTERRUPTED_MESSAGE = "The service stopped before the run finished"
INTERNAL_MESSAGE = "The run failed because of an internal error; the server log has details"

Hook = Callable[[uuid.UUID], Awaitable[None]]


class PipelineRunner:
    """Holds the run tasks of this process; built once per app (app.state.runner)."""

    def __init__(
        self,
        database: Database,
        storage: Storage,
        settings: Settings,
        engine: PipelineEngine | None = None,
        metrics: MetricsCollector | None = None,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.storage = storage
        self.settings = settings
        self.engine = engine or PipelineEngine(database, storage, settings)
        self._slots = asyncio.Semaphore(settings.PIPELINE_MAX_CONCURRENT_RUNS)
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._executing: set[uuid.UUID] = set()
        self._accepting = True
        # Called once a run holds a slot and is marked running, before its phases start.
        # A seam for tests (hold runs at a gate) and for instrumentation.
        self.before_execute: Hook | None = None

    @property
    def executing(self) -> int:
        """Runs holding a slot right now."""
        return len(self._executing)

    def submit(self, run_id: uuid.UUID, seed: RunTraceSeed | None = None) -> None:
        """Schedule a committed `queued` run. Refused (RuntimeError) after shutdown began.

        `seed` (from the request that queued the run) gives the run's trace its
        planned id and the link back to that request.
        """
        if not self._accepting:
            raise RuntimeError("the pipeline runner is shutting down")
        task = asyncio.create_task(self._run(run_id, seed), name=f"pipeline-run-{run_id}")
        self._tasks[run_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(run_id, None))

    async def recover(self) -> int:
        """At start-up: runs left `running` or `queued` by a previous process cannot
        resume (their task died with it), so they become `interrupted`."""
        try:
            async with self.database.session() as session:
                result = await session.execute(
                    update(PipelineRun)
                    .where(PipelineRun.status.in_([RunStatus.RUNNING, RunStatus.QUEUED]))
                    .values(
                        status=RunStatus.INTERRUPTED,
                        finished_at=datetime.now(UTC),
                        error_message=INTERRUPTED_MESSAGE,
                    )
                )
                count = int(getattr(result, "rowcount", 0) or 0)
        except (SQLAlchemyError, OSError) as exc:
            # The database may still be coming up; readiness says so, the app still starts.
            logger.warning("pipeline.recover.skipped", reason=type(exc).__name__)
            return 0
        if count:
            logger.warning("pipeline.runs.interrupted", count=count)
        return count

    async def shutdown(self, drain_seconds: float) -> None:
        """Stop taking runs; let executing runs finish for up to `drain_seconds`,
        then cancel what is left. Every run not finished ends `interrupted`."""
        self._accepting = False
        tasks = dict(self._tasks)
        # Queued runs would only start now to be cut short: stop them at once.
        for run_id, task in tasks.items():
            if run_id not in self._executing:
                task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks.values(), timeout=drain_seconds)
            for task in pending:
                # Cancel once: a second cancel would cut short the task's own clean-up
                # (rollback, marking the run interrupted).
                if not task.cancelling():
                    task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            # A task cancelled before its first step never ran its own clean-up.
            await self._interrupt_leftovers(list(tasks))
        logger.info("pipeline.runner.stopped", runs=len(tasks))

    async def join(self) -> None:
        """Wait until every submitted run has finished (for tools and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def _interrupt_leftovers(self, run_ids: list[uuid.UUID]) -> None:
        try:
            async with self.database.session() as session:
                await session.execute(
                    update(PipelineRun)
                    .where(
                        PipelineRun.id.in_(run_ids),
                        PipelineRun.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]),
                    )
                    .values(
                        status=RunStatus.INTERRUPTED,
                        finished_at=datetime.now(UTC),
                        error_message=INTERRUPTED_MESSAGE,
                    )
                )
        except Exception:
            logger.exception("pipeline.runner.interrupt_failed")

    async def _run(self, run_id: uuid.UUID, seed: RunTraceSeed | None) -> None:
        # The task runs in a copy of the submitting request's context: drop that
        # request's log fields (request_id, user, ...), which would misattribute the
        # run's lines. The copy is the task's own, so neither this nor run_id reaches
        # the request or any other task.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(run_id=str(run_id))
        with run_span(run_id, seed) as span:
            await self._run_traced(run_id, span)

    async def _run_traced(self, run_id: uuid.UUID, span: Span) -> None:
        """Wait for a slot, execute, record the outcome in the database and on `span`."""
        try:
            async with self._slots:
                # The root span opened at submission; this marks the end of the queue wait.
                span.add_event("pipeline.run.slot_acquired")
                if not self._accepting:
                    # Shutdown began while this run waited for a slot: it never starts.
                    set_run_outcome(span, RunStatus.INTERRUPTED.value)
                    span.set_status(Status(StatusCode.ERROR, INTERRUPTED_MESSAGE))
                    await self._finish_unsuccessfully(
                        run_id, RunStatus.INTERRUPTED, INTERRUPTED_MESSAGE
                    )
                    return
                input_path = await self._mark_running(run_id)
                if input_path is None:
                    set_run_outcome(span, "skipped")
                    return
                span.set_attribute("pipeline.input_path", input_path)
                self._executing.add(run_id)
                try:
                    if self.before_execute is not None:
                        await self.before_execute(run_id)
                    result = await self.engine.execute(run_id, input_path)
                finally:
                    self._executing.discard(run_id)
        except asyncio.CancelledError:
            set_run_outcome(span, RunStatus.INTERRUPTED.value)
            span.set_status(Status(StatusCode.ERROR, INTERRUPTED_MESSAGE))
            with anyio.CancelScope(shield=True):
                await self._finish_unsuccessfully(
                    run_id, RunStatus.INTERRUPTED, INTERRUPTED_MESSAGE
                )
            raise
        except PipelineFailure as exc:
            set_run_outcome(span, RunStatus.FAILED.value)
            span.set_status(Status(StatusCode.ERROR, exc.message))
            logger.warning("pipeline.run.failed", reason=exc.message)
            await self._finish_unsuccessfully(run_id, RunStatus.FAILED, exc.message)
        except Exception as exc:
            set_run_outcome(span, RunStatus.FAILED.value)
            record_error(span, exc)
            logger.exception("pipeline.run.crashed")
            await self._finish_unsuccessfully(run_id, RunStatus.FAILED, INTERNAL_MESSAGE)
        else:
            set_run_outcome(span, RunStatus.COMPLETED.value, result.counts.as_dict())
            await self._mark_completed(run_id, result)

    async def _mark_running(self, run_id: uuid.UUID) -> str | None:
        async with self.database.session() as session:
            run = await session.scalar(
                select(PipelineRun).where(PipelineRun.id == run_id).with_for_update()
            )
            if run is None or run.status != RunStatus.QUEUED:
                logger.warning("pipeline.run.not_queued", status=run.status if run else None)
                return None
            run.status = RunStatus.RUNNING
            run.started_at = datetime.now(UTC)
            run.output_prefix = self.engine.output_prefix(run_id)
            # The id the run's trace really has (the planned one, unless another
            # tracer provider chose its own); None when tracing is off.
            run.trace_id = current_trace_id()
            input_path = run.input_path
        logger.info("pipeline.run.started", input_path=input_path)
        return input_path

    async def _mark_completed(self, run_id: uuid.UUID, result: RunResult) -> None:
        counts = result.counts
        async with self.database.session() as session:
            await session.execute(
                update(PipelineRun)
                .where(PipelineRun.id == run_id)
                .values(
                    status=RunStatus.COMPLETED,
                    finished_at=datetime.now(UTC),
                    total_loans=counts.total,
                    eligible_loans=counts.eligible,
                    ineligible_loans=counts.ineligible,
                    rejected_loans=counts.rejected,
                    exception_count=counts.exceptions,
                    phase_durations=result.durations,
                )
            )
        logger.info("pipeline.run.completed", **counts.as_dict())
        if self.metrics is not None:
            self.metrics.record_pipeline_run(RunStatus.COMPLETED.value, counts.total)

    async def _finish_unsuccessfully(
        self, run_id: uuid.UUID, status: RunStatus, message: str
    ) -> None:
        """Record the outcome and remove anything the run wrote, so no partial result
        can pass for a complete one."""
        if self.metrics is not None:
            self.metrics.record_pipeline_run(status.value, 0)
        try:
            async with self.database.session() as session:
                await session.execute(delete(LoanFact).where(LoanFact.run_id == run_id))
                await session.execute(delete(LoanException).where(LoanException.run_id == run_id))
                await session.execute(
                    update(PipelineRun)
                    .where(PipelineRun.id == run_id)
                    .values(
                        status=status, finished_at=datetime.now(UTC), error_message=message[:1000]
                    )
                )
        except Exception:
            logger.exception("pipeline.run.status_write_failed", status=status.value)
        prefix = self.engine.output_prefix(run_id)
        for name in ("summary.json", "eligible.csv", "exceptions.csv"):
            try:
                await self.storage.delete(prefix + name)
            except Exception:  # noqa: S112 (absent is the usual case; nothing else to do)
                continue
