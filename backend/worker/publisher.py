"""Handing runs to the broker (PIPELINE_EXECUTOR=celery), from API processes and workers."""

from __future__ import annotations

import asyncio
import uuid

import structlog
from celery import Celery

from backend.config import Settings
from backend.database import Database
from backend.observability.instrumentation import instrument_celery
from backend.pipeline.dispatch import DispatchFailed, RunDispatcher
from backend.pipeline.leases import Leases
from backend.resilience import CircuitBreaker, CircuitOpen
from backend.worker.celery_app import RUN_TASK, create_celery

logger = structlog.get_logger(__name__)


def publish(app: Celery, run_id: uuid.UUID) -> None:
    """Send the run's message (blocking; bounded by the app's publish retry policy).

    Through the registered task, so that the Celery instrumentation sees it:
    a publish span under the current span, and that context in the message.
    """
    app.tasks[RUN_TASK].apply_async(args=[str(run_id)], retry=True)


class CeleryPublisher(RunDispatcher):
    """The API side of the Celery executor: publishes runs, recovers orphaned ones."""

    def __init__(self, database: Database, settings: Settings, app: Celery | None = None) -> None:
        super().__init__(settings, Leases(database, settings.PIPELINE_LEASE_SECONDS))
        self.app = app or create_celery(settings)
        self.breaker = CircuitBreaker(
            "broker", settings.CIRCUIT_FAILURE_THRESHOLD, settings.CIRCUIT_RECOVERY_SECONDS
        )
        instrument_celery()

    def check_available(self) -> None:
        if self.breaker.state == "open":
            raise CircuitOpen(self.breaker)

    @property
    def queue_owner(self) -> None:
        return None

    async def dispatch(self, run_id: uuid.UUID) -> None:
        """Publish the committed run, then clear its publish deadline (the broker has it)."""
        if not self.accepting:
            raise DispatchFailed("shutting down")
        if not self.breaker.allow():
            raise DispatchFailed("the broker is unavailable", self.breaker.retry_after())
        try:
            await publish_bounded(self.app, run_id, self.settings)
        except DispatchFailed as exc:
            self.breaker.failure(exc)
            raise
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        await self.leases.published(run_id)

    async def shutdown(self, drain_seconds: float) -> None:
        """Runs live in the broker and the workers: nothing to drain here."""
        self.accepting = False
        await self.stop_recovery()
        await asyncio.to_thread(self.app.close)


async def publish_bounded(app: Celery, run_id: uuid.UUID, settings: Settings) -> None:
    """`publish` off the event loop, within CELERY_PUBLISH_TIMEOUT_SECONDS; DispatchFailed
    otherwise."""
    try:
        async with asyncio.timeout(settings.CELERY_PUBLISH_TIMEOUT_SECONDS):
            # A worker thread (kombu is blocking); the context, and so the current span,
            # goes with it.
            await asyncio.to_thread(publish, app, run_id)
    except TimeoutError:
        logger.warning("pipeline.run.publish_failed", run_id=str(run_id), reason="timeout")
        raise DispatchFailed("the broker did not answer in time") from None
    except Exception as exc:
        logger.warning("pipeline.run.publish_failed", run_id=str(run_id), reason=type(exc).__name__)
        raise DispatchFailed("the broker is unreachable") from exc
