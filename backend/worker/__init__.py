"""Celery workers for pipeline runs (PIPELINE_EXECUTOR=celery).

`celery -A backend.worker worker` (or `make worker`) finds the Celery app as
`backend.worker.app`, built from the process settings on first access, so
that importing this package never reads the environment.
"""

from __future__ import annotations

from typing import Any

from backend.worker.celery_app import RUN_TASK, create_celery

__all__ = ["RUN_TASK", "create_celery"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from backend.config import get_settings
        from backend.worker import bootstrap

        application = create_celery(get_settings())
        bootstrap.connect_signals()
        globals()["app"] = application
        return application
    raise AttributeError(name)
