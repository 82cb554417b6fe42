"""A blocking telemetry call with a hard deadline, for flushes at shutdown."""

from __future__ import annotations

import threading
from collections.abc import Callable


def within(seconds: float, call: Callable[[], object], name: str) -> bool:
    """Run `call` on a daemon thread and wait at most `seconds`; False when cut off.

    The SDK's force_flush ignores its own timeout and exporters retry with backoff,
    so a daemon thread with a bounded join is the only hard bound: a collector that
    is slow or gone costs the process exit `seconds`, never more.
    """
    worker = threading.Thread(target=call, name=name, daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive()
