"""Graceful shutdown: draining on SIGTERM, then an orderly stop.

Sequence on SIGTERM under uvicorn:
1. at once: `app.state.draining = True`, so /health/ready answers 503 "draining"
   (liveness stays 200) and the load balancer stops routing here;
2. after SHUTDOWN_DRAIN_DELAY_SECONDS: uvicorn is told to exit; it stops accepting,
   lets in-flight requests finish (--timeout-graceful-shutdown), then runs the
   lifespan shutdown;
3. lifespan shutdown (`shutdown`): running pipeline runs get PIPELINE_DRAIN_SECONDS,
   telemetry is flushed, the engine disposed; the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog
from fastapi import FastAPI

from backend.config import Settings

logger = structlog.get_logger(__name__)

SignalHandler = Callable[[int, FrameType | None], Any]
TELEMETRY_FLUSH_MILLIS = 3000


def _hand_over(previous: SignalHandler, sig: int, frame: FrameType | None) -> None:
    """Let the server shut down as it would have on `sig`, but as a clean exit.

    Uvicorn's handler records the signal and re-raises it after its graceful
    shutdown, which ends the process as "killed by SIGTERM" (143). Setting its
    `should_exit` flag instead runs the same graceful shutdown and exits 0.
    """
    server = getattr(previous, "__self__", None)
    if server is not None and hasattr(server, "should_exit") and sig == signal.SIGTERM:
        server.should_exit = True
    else:
        previous(sig, frame)


def install_drain_handler(app: FastAPI, settings: Settings) -> Callable[[], None]:
    """Chain a SIGTERM handler in front of the server's; returns the uninstaller.

    Does nothing (and returns a no-op) when no server installed a handler, e.g.
    under tests, or off the main thread.
    """
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return lambda: None
    if not callable(previous):
        return lambda: None
    loop = asyncio.get_running_loop()
    delay = settings.SHUTDOWN_DRAIN_DELAY_SECONDS

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if getattr(app.state, "draining", False):
            _hand_over(previous, sig, frame)  # a second signal: no more waiting
            return
        app.state.draining = True
        logger.info("app.draining", signal="SIGTERM", drain_delay_seconds=delay)
        loop.call_soon_threadsafe(loop.call_later, delay, _hand_over, previous, sig, frame)

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        return lambda: None

    def uninstall() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return uninstall


async def drain_pipeline(app: FastAPI, settings: Settings) -> None:
    """Give running pipeline runs PIPELINE_DRAIN_SECONDS; the runner marks the rest."""
    runner = getattr(app.state, "runner", None)
    if runner is None:
        return
    drain = settings.PIPELINE_DRAIN_SECONDS
    try:
        # The runner owns the deadline; the margin only guards against a runner that hangs.
        async with asyncio.timeout(drain + 5):
            await runner.shutdown(drain)
    except TimeoutError:
        logger.error("pipeline.drain.timeout", drain_seconds=drain)
    except Exception:
        logger.exception("pipeline.drain.failed")
