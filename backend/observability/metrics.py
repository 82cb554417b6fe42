"""In-process request and pipeline metrics, read by admins at GET /admin/metrics.

One collector per application (`app.state.metrics`), so one per worker process:
figures describe this process only. Traces and logs are the fleet-wide view;
this is the quick look an admin takes at one instance. Memory is bounded: the
latency window keeps the most recent samples only and route keys are capped.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

# Enough samples for stable p99 figures; ~80 KB per window.
LATENCY_SAMPLES = 10_000
# Route templates are a finite set, but the method is client-chosen: cap the keys.
MAX_ROUTE_KEYS = 500
OTHER_ROUTE = "other"


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class _Window:
    started_at: float
    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))
    status_codes: Counter[int] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)


class MetricsCollector:
    """Thread-safe counters: requests, 5xx errors, latency percentiles, pipeline runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.time()
        self._window = _Window(started_at=self._started)
        self._requests_total = 0
        self._errors_total = 0
        self._runs: Counter[str] = Counter()
        self._loans_processed = 0

    def record_request(self, method: str, route: str, status_code: int, duration_ms: float) -> None:
        """Count one finished request; 5xx responses count as errors."""
        key = f"{method} {route}"
        with self._lock:
            window = self._window
            window.requests += 1
            window.latencies.append(duration_ms)
            window.status_codes[status_code] += 1
            if key not in window.routes and len(window.routes) >= MAX_ROUTE_KEYS:
                key = OTHER_ROUTE
            window.routes[key] += 1
            self._requests_total += 1
            if status_code >= 500:
                window.errors += 1
                self._errors_total += 1

    def record_pipeline_run(self, status: str, loans: int) -> None:
        """Count one finished run by its final status and the loans it read."""
        with self._lock:
            self._runs[status] += 1
            self._loans_processed += loans

    def reset_window(self) -> None:
        """Start a new window; totals since start-up are kept."""
        with self._lock:
            self._window = _Window(started_at=time.time())

    def snapshot(self) -> dict[str, Any]:
        """Current figures; error rates are percentages of requests."""
        with self._lock:
            window = self._window
            latencies = sorted(window.latencies)
            routes = window.routes.most_common(10)
            status_codes = dict(sorted(window.status_codes.items()))
            runs = dict(self._runs)
            now = time.time()
            return {
                "uptime_seconds": round(now - self._started, 1),
                "window_seconds": round(now - window.started_at, 1),
                "requests": {
                    "total": self._requests_total,
                    "errors_total": self._errors_total,
                    "error_rate": _rate(self._errors_total, self._requests_total),
                    "window": window.requests,
                    "window_errors": window.errors,
                    "window_error_rate": _rate(window.errors, window.requests),
                },
                "latency_ms": {
                    "samples": len(latencies),
                    "p50": round(percentile(latencies, 0.50), 2),
                    "p95": round(percentile(latencies, 0.95), 2),
                    "p99": round(percentile(latencies, 0.99), 2),
                    "max": round(latencies[-1], 2) if latencies else 0.0,
                },
                "status_codes": {str(code): count for code, count in status_codes.items()},
                "top_routes": dict(routes),
                "pipeline": {
                    "runs_total": sum(runs.values()),
                    "completed": runs.get("completed", 0),
                    "failed": runs.get("failed", 0),
                    "interrupted": runs.get("interrupted", 0),
                    "loans_processed": self._loans_processed,
                },
            }


def _rate(part: int, whole: int) -> float:
    return round(part / whole * 100, 2) if whole else 0.0
