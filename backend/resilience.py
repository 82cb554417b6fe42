"""Circuit breakers: one per dependency (database, rate-limit storage, broker), per process.

A breaker counts consecutive failures of calls to its dependency. At
`failure_threshold` it opens: callers are refused at once (503 with Retry-After,
or the rate limiter's fail-open/closed policy) instead of each waiting for a
timeout. After `recovery_seconds` it lets exactly one probe through (half open);
the probe's success closes it, its failure opens it for another period. Each
state change is one log line (`circuit.opened` warning, `circuit.half_open`,
`circuit.closed` info); the states are in /health/ready and /admin/metrics.

Why not a library: the maintained Python breakers either wrap only synchronous
or Tornado calls (pybreaker) or keep their state in their own storage layer
(purgatory); here a call is often not one awaitable (a request's session spans
the whole route), the single half-open probe must be claimed and released
around it, and the state must surface in readiness and metrics. That is the
small state machine below and nothing more.

State is per process on purpose: each process learns of an outage through its
own calls, and metrics label it as this process's view.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from backend.errors import ServiceUnavailable

logger = structlog.get_logger(__name__)

State = Literal["closed", "open", "half_open"]


class CircuitOpen(ServiceUnavailable):
    """A call refused without trying, because the dependency's breaker is open."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        retry_after = breaker.retry_after()
        super().__init__(
            f"The {breaker.name} is unavailable; please retry",
            details={"dependency": breaker.name, "retry_after_seconds": retry_after},
            headers={"Retry-After": str(retry_after)},
        )


@dataclass(eq=False)  # identity semantics: breakers are kept in weak sets
class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures; one probe after
    `recovery_seconds`; closed again on the probe's success. Thread-safe (Celery's
    publish runs in threads; everything else calls from the event loop)."""

    name: str
    failure_threshold: int = 5
    recovery_seconds: float = 30.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.opened_total = 0
        self.refused_total = 0
        self.last_error: str | None = None

    @property
    def state(self) -> State:
        with self._lock:
            return self._current()

    def _current(self) -> State:
        if self._state == "open" and time.monotonic() - self._opened_at >= self.recovery_seconds:
            return "half_open"
        return self._state

    def retry_after(self) -> int:
        """Whole seconds until the next probe may be let through (at least 1)."""
        with self._lock:
            waited = time.monotonic() - self._opened_at
            return max(1, math.ceil(self.recovery_seconds - waited))

    def allow(self) -> bool:
        """May a call go ahead now? In half open, True for one caller (the probe) only;
        that caller must then report `success()`, `failure()` or `release()`."""
        with self._lock:
            state = self._current()
            if state == "closed":
                return True
            if state == "half_open" and not self._probing:
                if self._state != "half_open":
                    self._state = "half_open"
                    logger.info("circuit.half_open", dependency=self.name)
                self._probing = True
                return True
            self.refused_total += 1
            return False

    def check(self) -> None:
        """`allow()`, raising CircuitOpen (the 503 envelope) when refused."""
        if not self.allow():
            raise CircuitOpen(self)

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._state != "closed":
                outage = round(time.monotonic() - self._opened_at, 3)
                self._state = "closed"
                logger.info("circuit.closed", dependency=self.name, open_seconds=outage)

    def failure(self, exc: BaseException | None = None) -> None:
        with self._lock:
            self._probing = False
            self._failures += 1
            if exc is not None:
                self.last_error = type(exc).__name__
            reopen = self._state == "half_open"
            if reopen or (self._state == "closed" and self._failures >= self.failure_threshold):
                first = self._state == "closed"
                self._state = "open"
                self._opened_at = time.monotonic()
                if first:
                    self.opened_total += 1
                    # One warning per outage; a failed probe only restarts the wait.
                    logger.warning(
                        "circuit.opened",
                        dependency=self.name,
                        failures=self._failures,
                        error_type=self.last_error,
                        recovery_seconds=self.recovery_seconds,
                    )

    def release(self) -> None:
        """Give the probe slot back without a verdict (the call was cancelled)."""
        with self._lock:
            self._probing = False

    @contextmanager
    def guard(self, is_failure: Any = None) -> Iterator[None]:
        """Around one call: refuse when open, then record how it went. `is_failure(exc)`
        says which exceptions count against the dependency (default: all)."""
        self.check()
        try:
            yield
        except BaseException as exc:
            counts = isinstance(exc, Exception) and (is_failure is None or is_failure(exc))
            if not counts:
                # Not the dependency's fault (a 404, a cancelled request): no verdict.
                self.release()
            else:
                self.failure(exc)
            raise
        self.success()

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "state": self._current(),
                "consecutive_failures": self._failures,
                "opened_total": self.opened_total,
                "refused_total": self.refused_total,
                "last_error": self.last_error,
            }
