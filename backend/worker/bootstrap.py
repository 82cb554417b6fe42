"""What each worker process sets up for itself, and how a run executes in it.

A `celery worker` is a main process that forks pool processes. Nothing that
holds threads, sockets or an event loop may cross that fork, so each pool
process builds its own at `worker_process_init`: one event loop kept for the
life of the process (the pipeline stays async: asyncpg COPY, async storage),
its own database engine and pool, tracing (exporter thread, Celery
instrumentation) and logging. `worker_process_shutdown` flushes spans (bounded)
and closes the pool. With a pool that does not fork (`--pool solo`), the same
set-up happens on the first task instead.

Shutdown: on SIGTERM the main process stops taking messages (Celery's warm
shutdown) and passes the signal to its pool processes. A pool process with a
run under way gives it PIPELINE_DRAIN_SECONDS to finish, then stops it and puts
it back on the queue (a second SIGTERM: at once); the message is acknowledged
either way, so the run is executed exactly once more, never lost. If the
process is killed outright instead, its lease expires and recovery re-queues
the run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from types import FrameType
from typing import Any

import psutil
import structlog
from celery import Celery, signals
from opentelemetry import trace

from backend.config import Settings
from backend.database import Database
from backend.observability import metrics as app_metrics
from backend.observability.instrumentation import instrument_celery, instrument_engine
from backend.observability.logging_config import configure_logging
from backend.observability.span_export import Tracing, process_tracer_provider
from backend.pipeline.executor import LeaseKeeper, Outcome, RunExecutor, StopReason
from backend.pipeline.leases import Leases
from backend.runtime import tune_for_latency
from backend.storage import Storage, create_storage
from backend.worker.publisher import publish_bounded

logger = structlog.get_logger(__name__)


class WorkerExecutor(RunExecutor):
    """A worker's executor: a run it hands back goes straight back to the broker."""

    def __init__(self, *args: Any, app: Celery, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = app

    async def hand_back(self, run_id: uuid.UUID) -> None:
        if not await self.leases.hand_back(run_id, requeue_now=True):
            return
        logger.info("pipeline.run.handed_back")
        # If this publish fails, the short lease it got expires and recovery publishes it.
        await publish_bounded(self.app, run_id, self.settings)
        await self.leases.published(run_id)


class WorkerProcess:
    """The per-process state of one worker (pool) process."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        configure_logging(settings)
        self.tracing = Tracing(settings)
        self.tracing.start()
        # Workers have no /metrics: their runs reach the dashboards over OTLP only.
        worker_settings = settings.model_copy(update={"METRICS_ENABLED": False})
        app_metrics.start_metrics(worker_settings, process_tracer_provider(settings).resource)
        instrument_celery()
        self.database = Database(settings)
        instrument_engine(self.database.engine)
        self.storage: Storage = create_storage(settings)
        leases = Leases(self.database, settings.PIPELINE_LEASE_SECONDS)
        self.keeper = LeaseKeeper(leases)
        self.executor = WorkerExecutor(
            self.database, self.storage, settings, leases, self.keeper, app=app
        )
        self.draining = False
        tune_for_latency(settings)
        logger.info("worker.process.started", owner=leases.owner)

    def execute(self, run_id: uuid.UUID) -> Outcome:
        _take_sigterm()
        # The task's span (Celery instrumentation: the message's consumer span, in the
        # trace of the request that queued the run) is linked from the run's span.
        delivered = trace.get_current_span().get_span_context()
        return self.loop.run_until_complete(self._execute(run_id, [delivered]))

    async def _execute(self, run_id: uuid.UUID, links: list[trace.SpanContext]) -> Outcome:
        self.keeper.start()
        try:
            if self.draining:
                # Taken from the broker just as shutdown began: straight back.
                return await self._return_unstarted(run_id)
            return await self.executor.execute(run_id, links=links)
        finally:
            await self.keeper.stop()

    async def _return_unstarted(self, run_id: uuid.UUID) -> Outcome:
        await publish_bounded(self.executor.app, run_id, self.settings)
        logger.info("pipeline.run.returned", run_id=str(run_id), reason="shutting down")
        return Outcome.HANDED_BACK

    def on_sigterm(self) -> None:
        """First SIGTERM: the run under way may finish within PIPELINE_DRAIN_SECONDS, then
        it is handed back; a second one: handed back now. Runs on the event loop."""
        if self.draining:
            self._stop_all()
            return
        self.draining = True
        drain = self.settings.PIPELINE_DRAIN_SECONDS
        logger.info("worker.draining", runs=len(self.executor.executing), drain_seconds=drain)
        self.loop.call_later(drain, self._stop_all)

    def _stop_all(self) -> None:
        for run_id in self.executor.executing:
            self.executor.stop(run_id, StopReason.SHUTDOWN)

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.storage.close())
            self.loop.run_until_complete(self.database.dispose())
        finally:
            app_metrics.flush_metrics(self.settings.OTEL_SHUTDOWN_TIMEOUT_SECONDS)
            self.tracing.shutdown()
            self.loop.close()
            logger.info("worker.process.stopped")


_process: WorkerProcess | None = None


def worker_process(app: Celery) -> WorkerProcess:
    """This process's state, built on first use (pools that do not fork)."""
    global _process
    if _process is None:
        _process = WorkerProcess(app, app.conf.loan_engine_settings)
    return _process


def execute_run(app: Celery, run_id: uuid.UUID) -> str:
    """The body of the run task."""
    return worker_process(app).execute(run_id).value


# ------------------------------------------------------------------- signals


_previous_sigterm: Any = signal.SIG_DFL


def _take_sigterm() -> None:
    """Handle SIGTERM here from now on. The pool installs its own handler after the
    process init signal (it exits at once), so this runs when a task starts."""
    global _previous_sigterm
    current = signal.getsignal(signal.SIGTERM)
    if current is not _on_sigterm:
        _previous_sigterm = current
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    process = _process
    if process is None or not process.loop.is_running():
        # No run under way: stop as the pool process would have (it cleans up on exit).
        if callable(_previous_sigterm):
            _previous_sigterm(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        return
    process.loop.call_soon_threadsafe(process.on_sigterm)


def _cli_app() -> Celery:
    from backend import worker

    app: Celery = worker.app
    return app


def _setup_logging(**_kwargs: Any) -> None:
    # Connected, so Celery leaves logging alone; ours is configured in each process.
    configure_logging(_cli_app().conf.loan_engine_settings)


def _process_init(**_kwargs: Any) -> None:
    worker_process(_cli_app())


def _process_shutdown(**_kwargs: Any) -> None:
    global _process
    process, _process = _process, None
    if process is not None:
        process.close()


def _shutting_down(**_kwargs: Any) -> None:
    """Main process, on SIGTERM/SIGINT/SIGQUIT: pass SIGTERM on to the pool processes,
    which Celery's warm shutdown would otherwise leave running their runs unbounded."""
    for child in psutil.Process().children():
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
    if _process is not None:  # a pool that does not fork runs tasks in this process
        _process.loop.call_soon_threadsafe(_process.on_sigterm)


def connect_signals() -> None:
    """Hook this module into a worker's life; called once with the CLI's app."""
    signals.setup_logging.connect(_setup_logging, weak=False)
    signals.worker_process_init.connect(_process_init, weak=False)
    signals.worker_process_shutdown.connect(_process_shutdown, weak=False)
    signals.worker_shutting_down.connect(_shutting_down, weak=False)
