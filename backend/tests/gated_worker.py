"""A Celery worker whose pool processes hold every run at the test gate before its phases.

`celery -A backend.tests.gated_worker worker`, with GATE_DIR set: see worker_support.Gate.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from backend import worker
from backend.tests.worker_support import wait_at_gate
from backend.worker import bootstrap

app = worker.app


def _gate(**_kwargs: Any) -> None:
    # Connected after the bootstrap's own handler, so the process state exists.
    bootstrap.worker_process(app).executor.before_phases = wait_at_gate


signals.worker_process_init.connect(_gate, weak=False)
