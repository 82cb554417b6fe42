"""The circuit breaker's state machine, on its own (the services use it in
test_resilience.py against real failing dependencies)."""

from __future__ import annotations

import time

import pytest

from backend.resilience import CircuitBreaker, CircuitOpen


def state(breaker: CircuitBreaker) -> str:
    """Read afresh each time (a plain attribute read would be narrowed by mypy)."""
    return str(breaker.describe()["state"])


def opened(recovery: float = 60.0) -> CircuitBreaker:
    breaker = CircuitBreaker("database", failure_threshold=2, recovery_seconds=recovery)
    breaker.failure(OSError())
    assert state(breaker) == "closed"
    breaker.failure(TimeoutError())
    assert state(breaker) == "open"
    return breaker


def test_consecutive_failures_open_it_and_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker("database", failure_threshold=2, recovery_seconds=60)
    breaker.failure(OSError())
    breaker.success()
    breaker.failure(OSError())
    assert state(breaker) == "closed"
    breaker.failure(OSError())
    assert state(breaker) == "open"
    assert breaker.describe()["last_error"] == "OSError"


def test_an_open_breaker_refuses_with_the_503_envelope_and_retry_after() -> None:
    breaker = opened()
    with pytest.raises(CircuitOpen) as refused:
        breaker.check()
    assert refused.value.status_code == 503
    assert refused.value.details == {"dependency": "database", "retry_after_seconds": 60}
    assert refused.value.headers == {"Retry-After": "60"}
    assert breaker.describe()["refused_total"] == 1


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker = opened(recovery=0.001)
    deadline = time.monotonic() + 5
    while state(breaker) != "half_open":
        assert time.monotonic() < deadline
    assert breaker.allow() is True
    assert breaker.allow() is False  # the probe is out: everyone else is refused
    breaker.release()  # cancelled probe: no verdict, the next caller probes
    assert breaker.allow() is True
    breaker.success()
    assert state(breaker) == "closed" and breaker.allow() is True


def test_a_failed_probe_opens_it_again_without_a_second_outage() -> None:
    breaker = opened(recovery=0.001)
    while not breaker.allow():
        pass
    breaker.recovery_seconds = 60
    breaker.failure(OSError())
    assert state(breaker) == "open"
    assert breaker.describe()["opened_total"] == 1


def test_guard_counts_only_what_the_predicate_blames_on_the_dependency() -> None:
    breaker = CircuitBreaker("database", failure_threshold=1, recovery_seconds=60)
    with pytest.raises(KeyError), breaker.guard(lambda exc: isinstance(exc, OSError)):
        raise KeyError("not the database's fault")
    assert state(breaker) == "closed"
    blames_os_errors = breaker.guard(lambda exc: isinstance(exc, OSError))
    with pytest.raises(OSError, match="refused"), blames_os_errors:
        raise OSError("connection refused")
    assert state(breaker) == "open"
