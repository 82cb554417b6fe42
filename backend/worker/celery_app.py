"""The Celery application: broker settings a production queue needs, and the run task."""

from __future__ import annotations

import uuid

from celery import Celery, Task

from backend.config import Settings

RUN_TASK = "loan_engine.pipeline.run"


def create_celery(settings: Settings) -> Celery:
    """A Celery app for `settings`: publishes runs (API) and executes them (workers).

    Delivery is at least once: a message is acknowledged only after its task
    returned (`task_acks_late`), given back if the process executing it dies
    (`task_reject_on_worker_lost`), and each pool process reserves one message
    at a time (prefetch 1), so a long run never holds others hostage. A
    redelivered message for a run that is finished or owned by a live worker
    does nothing: the run's lease decides, not the broker.
    """
    app = Celery("loan_engine")
    app.conf.update(
        broker_url=settings.CELERY_BROKER_URL,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.CELERY_PUBLISH_TIMEOUT_SECONDS,
        broker_transport_options={
            # Redis and SQS redeliver an unacknowledged message after this long.
            "visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT_SECONDS,
            "socket_connect_timeout": settings.CELERY_PUBLISH_TIMEOUT_SECONDS,
            # A broker that accepts and never answers must free the publishing thread.
            "socket_timeout": settings.CELERY_PUBLISH_TIMEOUT_SECONDS,
        },
        task_default_queue=settings.CELERY_QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.4,
            "interval_max": 1.0,
        },
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.CELERY_WORKER_CONCURRENCY,
        # Logging is ours (JSON on stdout), configured in every process.
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    app.conf.loan_engine_settings = settings

    @app.task(name=RUN_TASK, bind=True)  # type: ignore[untyped-decorator]
    def run_pipeline(task: Task, run_id: str) -> str:
        """Execute one run in this worker process; returns how the execution ended."""
        from backend.worker.bootstrap import execute_run

        return execute_run(task.app, uuid.UUID(run_id))

    return app
