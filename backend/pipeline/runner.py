"""The in-process executor: runs execute as asyncio tasks of this API process.

PIPELINE_EXECUTOR=inprocess (the default; `make run` needs no broker). A run
queued here belongs to this process from the start (`queue_owner`) and its
lease is renewed while it waits for one of PIPELINE_MAX_CONCURRENT_RUNS slots
and while it executes, so that if this process dies, any other process's
recovery picks the run up once the lease expires. At shutdown, runs that
cannot finish within PIPELINE_DRAIN_SECONDS are handed back: their lease ends
at once and the next recovery pass, here after a restart or in any other live
process, queues them again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import structlog

from backend.config import Settings
from backend.database import Database
from backend.pipeline.dispatch import DispatchFailed, RunDispatcher
from backend.pipeline.engine import PipelineEngine
from backend.pipeline.executor import LeaseKeeper, RunExecutor, StopReason
from backend.pipeline.leases import Leases
from backend.storage import Storage

logger = structlog.get_logger(__name__)

Hook = Callable[[uuid.UUID], Awaitable[None]]


class PipelineRunner(RunDispatcher):
    """Executes this process's runs, at most PIPELINE_MAX_CONCURRENT_RUNS at a time."""

    def __init__(
        self,
        database: Database,
        storage: Storage,
        settings: Settings,
        engine: PipelineEngine | None = None,
    ) -> None:
        leases = Leases(database, settings.PIPELINE_LEASE_SECONDS)
        super().__init__(settings, leases)
        self.keeper = LeaseKeeper(leases)
        self.executor = RunExecutor(database, storage, settings, leases, self.keeper, engine=engine)
        self._slots = asyncio.Semaphore(settings.PIPELINE_MAX_CONCURRENT_RUNS)
        self._tasks: dict[uuid.UUID, asyncio.Task[None]] = {}

    @property
    def engine(self) -> PipelineEngine:
        return self.executor.engine

    @property
    def before_execute(self) -> Hook | None:
        """Called once a run holds a slot and is claimed (running), before its phases."""
        return self.executor.before_phases

    @before_execute.setter
    def before_execute(self, hook: Hook | None) -> None:
        self.executor.before_phases = hook

    @property
    def queue_owner(self) -> str:
        return self.leases.owner

    @property
    def executing(self) -> int:
        """Runs holding a slot right now."""
        return len(self.executor.executing)

    async def start(self) -> None:
        self.keeper.start()
        await super().start()

    async def dispatch(self, run_id: uuid.UUID) -> None:
        """Queue a committed run owned here; refused (DispatchFailed) once shutdown began."""
        if not self.accepting:
            raise DispatchFailed("the pipeline runner is shutting down")
        if run_id in self._tasks:
            return
        # Renewed from now on: waiting for a slot is part of holding the run. Lost while
        # waiting, the claim below finds it taken and does nothing.
        self.keeper.hold(run_id, lambda: None)
        task = asyncio.create_task(self._run(run_id), name=f"pipeline-run-{run_id}")
        self._tasks[run_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(run_id, None))

    async def _run(self, run_id: uuid.UUID) -> None:
        try:
            async with self._slots:
                if not self.accepting:
                    return  # shutdown hands it back
                await self.executor.execute(run_id)
        except Exception:
            # The executor records the run's own failures; this is its bookkeeping failing
            # (the database went away). The lease runs out and recovery retries the run.
            logger.exception("pipeline.run.executor_failed", run_id=str(run_id))
        finally:
            if self.accepting:  # at shutdown, what is still held is handed back
                self.keeper.release(run_id)

    async def shutdown(self, drain_seconds: float) -> None:
        """Stop taking runs; executing runs get `drain_seconds` to finish, the rest
        (and every run still waiting for a slot) are handed back."""
        self.accepting = False
        await self.stop_recovery()
        tasks = dict(self._tasks)
        waiting = [run_id for run_id in tasks if run_id not in self.executor.executing]
        for run_id in waiting:
            tasks[run_id].cancel()
        if tasks and drain_seconds > 0:
            await asyncio.wait(tasks.values(), timeout=drain_seconds)
        for run_id in list(self.executor.executing):
            self.executor.stop(run_id, StopReason.SHUTDOWN)
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        # Runs that never reached the executor (waiting for a slot) still hold a lease.
        for run_id in self.keeper.held | set(waiting):
            self.keeper.release(run_id)
            try:
                if await self.leases.hand_back(run_id, requeue_now=False):
                    logger.info("pipeline.run.handed_back", run_id=str(run_id))
            except Exception:
                logger.exception("pipeline.run.hand_back_failed", run_id=str(run_id))
        await self.keeper.stop()
        logger.info("pipeline.runner.stopped", runs=len(tasks))

    async def join(self) -> None:
        """Wait until every dispatched run has finished (for tools and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)
