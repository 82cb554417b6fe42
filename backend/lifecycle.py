"""Graceful shutdown: draining on SIGTERM, then an orderly stop.

Sequence on SIGTERM under uvicorn:
1. at once: `app.state.draining = True`, so /health/ready answers 503 "draining"
   (liveness stays 200) and the load balancer stops routing here;
   meanwhile every response carries `Connection: close` (middleware/draining.py),
   so clients leave each connection after its response;
2. after SHUTDOWN_DRAIN_DELAY_SECONDS: the listener closes without cutting any
   request (`close_listeners`), then uvicorn is told to exit; it lets in-flight
   requests finish (--timeout-graceful-shutdown), closes the connections left
   idle, then runs the lifespan shutdown;
3. lifespan shutdown (`shutdown`): running pipeline runs get PIPELINE_DRAIN_SECONDS,
   telemetry is flushed, the engine disposed; the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import select
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI

from backend.config import Settings

logger = structlog.get_logger(__name__)

SignalHandler = Callable[[int, FrameType | None], Any]
TELEMETRY_FLUSH_MILLIS = 3000
# A connection accepted just before the listener closed sends its request within
# milliseconds; one still silent after this long is left to uvicorn, which closes it.
FIRST_REQUEST_WAIT_SECONDS = 1.0
_POLL_SECONDS = 0.005


def _uvicorn_server(handler: SignalHandler) -> uvicorn.Server | None:
    """The uvicorn server whose bound `handle_exit` `handler` is, if it is one."""
    server = getattr(handler, "__self__", None)
    return server if isinstance(server, uvicorn.Server) else None


def _hand_over(previous: SignalHandler, sig: int, frame: FrameType | None) -> None:
    """Let the server shut down as it would have on `sig`, but as a clean exit.

    Uvicorn's handler records the signal and re-raises it after its graceful
    shutdown, which ends the process as "killed by SIGTERM" (143). Setting its
    `should_exit` flag instead runs the same graceful shutdown and exits 0.
    """
    server = _uvicorn_server(previous)
    if server is not None and sig == signal.SIGTERM:
        server.should_exit = True
    else:
        previous(sig, frame)


def _accept_queue_holds(fds: list[int]) -> bool:
    """Whether any listening socket `fds` has established connections waiting to be accepted."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


async def _poll_until(condition: Callable[[], bool], deadline: float) -> None:
    """Return once `condition()` holds or the loop's clock passes `deadline`."""
    # Polled: neither the kernel's accept queue nor uvicorn's connections signal an event.
    loop = asyncio.get_running_loop()
    while True:
        if condition() or loop.time() >= deadline:
            return
        await asyncio.sleep(_POLL_SECONDS)


def _awaiting_first_request(server: uvicorn.Server) -> int:
    """Connections accepted whose first request has not been read yet."""
    # uvicorn's HTTP protocols have no `cycle` until a request's headers are parsed.
    return sum(1 for conn in server.server_state.connections if getattr(conn, "cycle", 0) is None)


async def close_listeners(
    server: uvicorn.Server, wait_seconds: float = FIRST_REQUEST_WAIT_SECONDS
) -> None:
    """Stop accepting connections without losing a request a client has sent.

    Two ways uvicorn's own shutdown loses one: closing a listening socket resets
    the connections still in its accept queue, and a connection accepted whose
    request has not been read yet is simply closed. So the listeners close the
    moment their accept queues are seen empty (the server accepts as long as
    they are open), and then the connections accepted last get what is left of
    `wait_seconds` for their request to arrive; it is served as any other, with
    `Connection: close`. Clients connecting later are refused: nothing was sent.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    servers = list(getattr(server, "servers", ()))
    fds = [sock.fileno() for each in servers for sock in each.sockets]
    await _poll_until(lambda: not _accept_queue_holds(fds), deadline)
    # In the same step as the check: only a handshake completing in these few
    # microseconds could still be queued, and reset, when the sockets close.
    for each in servers:
        each.close()
    await _poll_until(lambda: not _awaiting_first_request(server), deadline)
    logger.info(
        "app.listener.closed",
        connections=len(server.server_state.connections),
        awaiting_first_request=_awaiting_first_request(server),
    )


async def _stop(previous: SignalHandler, sig: int, frame: FrameType | None) -> None:
    """The end of the drain delay: close the listener cleanly, then let the server exit."""
    server = _uvicorn_server(previous)
    if server is not None and sig == signal.SIGTERM and not server.should_exit:
        try:
            await close_listeners(server)
        except Exception:
            # uvicorn's own shutdown still closes the listener: only the care is lost.
            logger.exception("app.listener.close_failed")
    _hand_over(previous, sig, frame)


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
    stopping: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    def stop(sig: int, frame: FrameType | None) -> None:
        task = loop.create_task(_stop(previous, sig, frame))
        stopping.add(task)
        task.add_done_callback(stopping.discard)

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if getattr(app.state, "draining", False):
            _hand_over(previous, sig, frame)  # a second signal: no more waiting
            return
        app.state.draining = True
        # The handler runs between two bytecodes of whatever the main thread was doing,
        # inside that task's context (a request's request_id, user and span, a run's
        # run_id): the line, and the stop that follows, get an empty context instead.
        clean = contextvars.Context()
        clean.run(logger.info, "app.draining", signal="SIGTERM", drain_delay_seconds=delay)
        later = functools.partial(loop.call_later, delay, stop, sig, frame, context=clean)
        loop.call_soon_threadsafe(later, context=clean.copy())

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        return lambda: None

    def uninstall() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return uninstall


async def drain_pipeline(app: FastAPI, settings: Settings) -> None:
    """Give running pipeline runs PIPELINE_DRAIN_SECONDS; the runner hands back the rest."""
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
