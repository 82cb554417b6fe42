"""Interpreter settings for a server process, applied once its start-up is done.

A process that executes pipeline runs in worker threads (the in-process
executor) shares the GIL and the garbage collector with its event loop, and
both decide how long the loop can stall:

- `gc.freeze()` moves everything start-up built (modules, the app, the
  settings, the ORM mappers) out of the collector's reach, so the full
  collections a long run triggers do not scan it again and again, and a
  higher first-generation threshold makes collections rarer: a 100,000-loan
  run then triggers about 5 instead of 1,000, one of them a full one instead
  of 8 (a full pass over a run's objects holds the GIL 5-30 ms);
- the GIL switch interval is how long the loop may wait for the GIL while a
  worker thread computes (Python's default is 5 ms, paid at every hand-over).
"""

from __future__ import annotations

import gc
import sys

import structlog

from backend.config import Settings

logger = structlog.get_logger(__name__)

# Allocations before a young collection (Python: 700), and the older generations'
# (Python: 10, 10): fewer, cheaper collections for the same garbage.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_for_latency(settings: Settings) -> None:
    """Apply RUNTIME_GC_TUNING and RUNTIME_GIL_SWITCH_INTERVAL_MS to this process."""
    if settings.RUNTIME_GC_TUNING:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(settings.RUNTIME_GIL_SWITCH_INTERVAL_MS / 1000)
    logger.info(
        "runtime.tuned",
        gc_frozen_objects=gc.get_freeze_count(),
        gil_switch_interval_ms=settings.RUNTIME_GIL_SWITCH_INTERVAL_MS,
    )
