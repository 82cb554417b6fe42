"""How a committed `queued` run reaches an executor, and how dead owners' runs come back.

Every API process holds one dispatcher (`app.state.runner`), chosen by
PIPELINE_EXECUTOR: the in-process runner (`backend.pipeline.runner`) or the
Celery publisher (`backend.worker.publisher`). Both share what is here:

- `accepting`: False once shutdown began (a submit then answers 503);
- `queue_owner`: who a new queued row belongs to (this process for the
  in-process runner, nobody for Celery: the broker holds it);
- recovery: at start-up and then every third of PIPELINE_LEASE_SECONDS, runs
  whose lease has expired (their owner died, hung, or handed them back) are
  re-queued and dispatched again, or failed after PIPELINE_MAX_ATTEMPTS.
  Runs with a live lease are never touched, so a process that starts (a second
  worker, a rolling deploy) leaves the runs of live processes alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from abc import ABC, abstractmethod

import structlog
from sqlalchemy.exc import SQLAlchemyError

from backend.config import Settings
from backend.observability import metrics as app_metrics
from backend.pipeline.leases import Leases

logger = structlog.get_logger(__name__)


class DispatchFailed(Exception):
    """The run could not be handed to an executor (e.g. the broker is unreachable);
    `retry_after` is the number of seconds a client should wait."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class RunDispatcher(ABC):
    """Hands queued runs to executors and recovers runs whose owner went silent."""

    def __init__(self, settings: Settings, leases: Leases) -> None:
        self.settings = settings
        self.leases = leases
        self.accepting = True
        self._recovery: asyncio.Task[None] | None = None

    def check_available(self) -> None:
        """Raise CircuitOpen (503) when runs cannot be handed over now; by default they can."""
        return None

    @property
    @abstractmethod
    def queue_owner(self) -> str | None:
        """The owner written on a run queued here (None: whoever claims it)."""

    @abstractmethod
    async def dispatch(self, run_id: uuid.UUID) -> None:
        """Hand over a committed `queued` run; raises DispatchFailed when it cannot."""

    async def start(self) -> None:
        """Recover what dead owners left, then keep doing it in the background."""
        await self.recover()
        self._recovery = asyncio.create_task(self._recover_forever(), name="pipeline-recovery")

    async def stop_recovery(self) -> None:
        task, self._recovery = self._recovery, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @abstractmethod
    async def shutdown(self, drain_seconds: float) -> None:
        """Stop taking runs and let go of the ones held here within `drain_seconds`."""

    async def recover(self) -> int:
        """One recovery pass; returns how many runs were re-queued here."""
        try:
            recovered = await self.leases.recover_expired(
                self.settings.PIPELINE_MAX_ATTEMPTS, new_owner=self.queue_owner
            )
        except (SQLAlchemyError, OSError) as exc:
            # The database may be down or still coming up; the next pass tries again.
            logger.warning("pipeline.recovery.skipped", reason=type(exc).__name__)
            return 0
        with contextlib.suppress(SQLAlchemyError, OSError):
            # The queue-depth gauge: a figure for all processes, refreshed each pass.
            app_metrics.set_queue_depth(await self.leases.count_queued())
        if recovered.failed:
            app_metrics.pipeline_runs.add(len(recovered.failed), {"status": "failed"})
            logger.warning(
                "pipeline.runs.gave_up",
                count=len(recovered.failed),
                run_ids=[str(run_id) for run_id in recovered.failed],
                max_attempts=self.settings.PIPELINE_MAX_ATTEMPTS,
            )
        for run_id in recovered.requeued:
            logger.warning("pipeline.run.requeued", run_id=str(run_id), reason="lease_expired")
            try:
                await self.dispatch(run_id)
            except DispatchFailed as exc:
                # Its short lease still stands: the next pass publishes it again.
                logger.warning("pipeline.run.dispatch_failed", run_id=str(run_id), reason=str(exc))
        return len(recovered.requeued)

    async def _recover_forever(self) -> None:
        interval = self.settings.PIPELINE_LEASE_SECONDS / 3
        while True:
            # Jitter, so that the processes of a fleet do not all scan at once.
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))  # noqa: S311
            if self.accepting:
                await self.recover()
