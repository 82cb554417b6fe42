"""Executing one run in the current event loop, under a lease: used by every executor.

`RunExecutor.execute(run_id)` claims the run, keeps its lease through the
`LeaseKeeper` of this loop, runs the seven phases inside the run's trace, and
records the outcome only while it still owns the run. The in-process runner
(API processes) and the Celery task (worker processes) both call it; they
differ only in where the call comes from.

Ways an execution ends:

- completed / failed: recorded (conditionally on ownership);
- skipped: the run was not queued any more (finished, or claimed elsewhere),
  e.g. a redelivered message; nothing is written;
- lost: the lease was lost mid-run (another process took the run over); the
  phases stop, persist rolls back, nothing is written;
- handed back: the process is stopping; the run returns to the queue.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

import structlog
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from backend.config import Settings
from backend.database import Database
from backend.models import RunStatus
from backend.observability import metrics as app_metrics
from backend.pipeline.engine import PipelineEngine, RunResult
from backend.pipeline.leases import Claim, Leases
from backend.pipeline.phases.base import LeaseLost, PipelineFailure
from backend.pipeline.telemetry import (
    RunTraceSeed,
    record_error,
    run_span,
    set_run_outcome,
)
from backend.storage import Storage

logger = structlog.get_logger(__name__)

INTERNAL_MESSAGE = "The run failed because of an internal error; the server log has details"
OUTPUT_FILES = ("summary.json", "eligible.csv", "exceptions.csv")


class Outcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    LOST = "lost"
    HANDED_BACK = "handed_back"


class StopReason(StrEnum):
    LEASE_LOST = "lease_lost"
    SHUTDOWN = "shutdown"


@dataclass
class _Held:
    on_lost: Callable[[], None]
    renewed_at: float = field(default_factory=time.monotonic)


class LeaseKeeper:
    """Renews, in one statement per interval, the lease of every run held in this loop.

    A run whose renewal finds it owned by someone else, or that could not be
    renewed for a whole lease period (database unreachable: another process may
    have taken it by now), is lost: its `on_lost` callback runs once.
    """

    def __init__(self, leases: Leases, interval: float | None = None) -> None:
        self.leases = leases
        self.interval = interval if interval is not None else leases.lease_seconds / 3
        self._held: dict[uuid.UUID, _Held] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def held(self) -> set[uuid.UUID]:
        return set(self._held)

    def hold(self, run_id: uuid.UUID, on_lost: Callable[[], None]) -> None:
        self._held[run_id] = _Held(on_lost)

    def release(self, run_id: uuid.UUID) -> None:
        self._held.pop(run_id, None)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="pipeline-lease-keeper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.renew_once()

    async def renew_once(self) -> None:
        """One renewal of every held lease; calls `on_lost` for those that are gone."""
        asked = dict(self._held)
        if not asked:
            return
        try:
            kept = await self.leases.renew(asked)
        except Exception as exc:  # the database is unreachable or failing
            logger.warning(
                "pipeline.lease.renew_failed", runs=len(asked), error_type=type(exc).__name__
            )
            now = time.monotonic()
            kept = {
                run_id
                for run_id, held in asked.items()
                if now - held.renewed_at < self.leases.lease_seconds
            }
        else:
            now = time.monotonic()
            for run_id in kept:
                held = self._held.get(run_id)
                if held is not None:
                    held.renewed_at = now
        for run_id, held in asked.items():
            # Released while renewing (the run ended): not lost, just finished.
            if run_id not in kept and self._held.get(run_id) is held:
                del self._held[run_id]
                held.on_lost()


class RunExecutor:
    """Executes runs in this event loop for one owner (`leases.owner`)."""

    def __init__(
        self,
        database: Database,
        storage: Storage,
        settings: Settings,
        leases: Leases,
        keeper: LeaseKeeper,
        engine: PipelineEngine | None = None,
    ) -> None:
        self.database = database
        self.storage = storage
        self.settings = settings
        self.leases = leases
        self.keeper = keeper
        self.engine = engine or PipelineEngine(database, storage, settings)
        self._executing: dict[uuid.UUID, asyncio.Task[object]] = {}
        self._stop_reasons: dict[uuid.UUID, StopReason] = {}
        # Called once a run is claimed, before its phases: a seam for tests (hold runs
        # at a gate) and for instrumentation. Stoppable like the phases.
        self.before_phases: Callable[[uuid.UUID], Awaitable[None]] | None = None

    @property
    def executing(self) -> set[uuid.UUID]:
        """Runs whose phases are under way here right now."""
        return set(self._executing)

    def stop(self, run_id: uuid.UUID, reason: StopReason) -> bool:
        """Ask the execution of `run_id` to stop (cancellation); False if none is under way."""
        task = self._executing.get(run_id)
        if task is None or task.done():
            return False
        self._stop_reasons.setdefault(run_id, reason)
        task.cancel()
        return True

    def _lost(self, run_id: uuid.UUID) -> None:
        if not self.stop(run_id, StopReason.LEASE_LOST):
            # Not in its phases (claiming, or recording the outcome): the conditional
            # writes there find out for themselves.
            logger.warning("pipeline.lease.lost", run_id=str(run_id))

    async def execute(
        self, run_id: uuid.UUID, *, links: list[trace.SpanContext] | None = None
    ) -> Outcome:
        """Claim and execute `run_id`. Never raises for the run's own failures; a
        cancellation that does not come from `stop` is passed on after the run is
        handed back."""
        # Log lines of the run name it, and nothing of whatever context called us.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(run_id=str(run_id))
        claim = await self.leases.claim(run_id, self.engine.output_prefix(run_id))
        if claim is None:
            status, owner = await self.leases.describe(run_id)
            logger.info("pipeline.run.skipped", status=status, owner=owner)
            return Outcome.SKIPPED
        task = asyncio.current_task()
        assert task is not None
        if claim.queued_at is not None and claim.started_at is not None:
            waited = (claim.started_at - claim.queued_at).total_seconds()
            app_metrics.queue_wait.record(max(0.0, waited))
        self.keeper.hold(run_id, lambda: self._lost(run_id))
        try:
            seed = RunTraceSeed.stored(claim.trace_id, claim.request_traceparent)
            with run_span(
                run_id,
                seed,
                attempt=claim.attempt,
                queued_at=claim.queued_at,
                claimed_at=claim.started_at,
                links=links,
            ) as span:
                return await self._traced(claim, span, task)
        finally:
            self.keeper.release(run_id)
            self._stop_reasons.pop(run_id, None)

    async def _traced(self, claim: Claim, span: Span, task: asyncio.Task[object]) -> Outcome:
        run_id = claim.run_id
        span.set_attribute("pipeline.input_path", claim.input_path)
        logger.info("pipeline.run.started", input_path=claim.input_path, attempt=claim.attempt)
        try:
            result = await self._phases(claim, task)
        except asyncio.CancelledError:
            reason = self._stop_reasons.get(run_id)
            if reason is None:
                # Not ours (the process is being torn down): hand back, then let it through.
                await asyncio.shield(self._hand_back(run_id, span))
                raise
            task.uncancel()
            if reason is StopReason.LEASE_LOST:
                return self._lost_midway(span, claim)
            return await self._hand_back(run_id, span)
        except LeaseLost:
            # Persist found the run taken over before it could commit: nothing was written.
            return self._lost_midway(span, claim, step="persist")
        except PipelineFailure as exc:
            set_run_outcome(span, RunStatus.FAILED.value)
            span.set_status(Status(StatusCode.ERROR, exc.message))
            logger.warning("pipeline.run.failed", reason=exc.message)
            return await self._fail(claim, exc.message)
        except Exception as exc:
            set_run_outcome(span, RunStatus.FAILED.value)
            record_error(span, exc)
            logger.exception("pipeline.run.crashed")
            return await self._fail(claim, INTERNAL_MESSAGE)
        return await self._complete(run_id, result, span)

    async def _phases(self, claim: Claim, task: asyncio.Task[object]) -> RunResult:
        """The stoppable part of an execution (`stop`): the bookkeeping around it runs whole."""
        self._executing[claim.run_id] = task
        try:
            if self.before_phases is not None:
                await self.before_phases(claim.run_id)
            return await self.engine.execute(
                claim.run_id,
                claim.input_path,
                owner=self.leases.owner,
                attempt=claim.attempt,
                output_prefix=claim.output_prefix,
            )
        finally:
            self._executing.pop(claim.run_id, None)

    def _lost_midway(self, span: Span, claim: Claim, step: str = "phases") -> Outcome:
        set_run_outcome(span, Outcome.LOST.value)
        span.set_status(Status(StatusCode.ERROR, "lease lost"))
        logger.warning("pipeline.run.lease_lost", attempt=claim.attempt, step=step)
        return Outcome.LOST

    async def _complete(self, run_id: uuid.UUID, result: RunResult, span: Span) -> Outcome:
        counts = result.counts
        # Stop renewing first: the write below is conditional on ownership anyway, and
        # a renewal racing it would take the finished run for a lost one.
        self.keeper.release(run_id)
        recorded = await self.leases.complete(
            run_id,
            {
                "total_loans": counts.total,
                "eligible_loans": counts.eligible,
                "ineligible_loans": counts.ineligible,
                "rejected_loans": counts.rejected,
                "exception_count": counts.exceptions,
                "phase_durations": result.durations,
            },
        )
        if not recorded:
            set_run_outcome(span, Outcome.LOST.value)
            logger.warning("pipeline.run.lease_lost", step="complete")
            return Outcome.LOST
        set_run_outcome(span, RunStatus.COMPLETED.value, counts.as_dict())
        logger.info("pipeline.run.completed", **counts.as_dict())
        app_metrics.pipeline_runs.add(1, {"status": RunStatus.COMPLETED.value})
        app_metrics.pipeline_loans.add(counts.total)
        return Outcome.COMPLETED

    async def _fail(self, claim: Claim, message: str) -> Outcome:
        """Record the failure and remove what the run wrote, so no partial result can
        pass for a complete one; only while this executor still owns the run."""
        run_id = claim.run_id
        self.keeper.release(run_id)
        try:
            recorded = await self.leases.fail(run_id, RunStatus.FAILED, message)
        except Exception:
            # The lease runs out and recovery retries the run: not lost, only late.
            logger.exception("pipeline.run.status_write_failed", status=RunStatus.FAILED.value)
            return Outcome.FAILED
        if not recorded:
            logger.warning("pipeline.run.lease_lost", step="fail")
            return Outcome.LOST
        app_metrics.pipeline_runs.add(1, {"status": RunStatus.FAILED.value})
        await self._delete_outputs(claim.output_prefix)
        return Outcome.FAILED

    async def _hand_back(self, run_id: uuid.UUID, span: Span) -> Outcome:
        set_run_outcome(span, Outcome.HANDED_BACK.value)
        span.set_status(Status(StatusCode.ERROR, "handed back: the process is stopping"))
        self.keeper.release(run_id)
        try:
            await self.hand_back(run_id)
        except Exception:
            # The lease simply runs out; recovery re-queues the run then.
            logger.exception("pipeline.run.hand_back_failed")
        return Outcome.HANDED_BACK

    async def hand_back(self, run_id: uuid.UUID) -> None:
        """Return a held run to the queue. The in-process runner ends the lease and lets
        recovery (in any live process) take the run; a worker re-queues it at once."""
        if await self.leases.hand_back(run_id, requeue_now=False):
            logger.info("pipeline.run.handed_back")

    async def _delete_outputs(self, prefix: str) -> None:
        for name in OUTPUT_FILES:
            try:
                await self.storage.delete(prefix + name)
            except Exception:  # noqa: S112 (absent is the usual case; nothing else to do)
                continue
