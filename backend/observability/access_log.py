"""The access line and the request's log context, on the hot path.

One `http.request.completed` line per request, with the same fields, shape and
redaction as every other line. In the JSON format it is rendered straight from
the processors (`logging_config.direct_renderer`) and written to the log stream,
skipping the stdlib LogRecord and formatter round trip that costs more than the
rest of a small request's logging. The console format goes through structlog.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

from backend.config import Settings
from backend.observability.logging_config import direct_renderer, write_line

LOGGER_NAME = "backend.access"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class AccessLog:
    """Writes the access lines of one application, at its LOG_LEVEL."""

    def __init__(self, settings: Settings) -> None:
        self.threshold = logging.getLevelName(settings.LOG_LEVEL)
        self.logger = structlog.get_logger(LOGGER_NAME)
        self.render = direct_renderer(settings) if settings.LOG_FORMAT == "json" else None

    @staticmethod
    def bind(context: dict[str, Any]) -> None:
        """Add the request's fields to the log context (RequestStart has emptied it)."""
        structlog.contextvars.bind_contextvars(**context)

    @staticmethod
    def unbind() -> None:
        structlog.contextvars.clear_contextvars()

    def _write(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if _LEVELS[level] < self.threshold:
            return
        if self.render is None:
            getattr(self.logger, level)(event, **fields)
            return
        write_line(self.render(LOGGER_NAME, level, {"event": event, **fields}))

    def started(self, user_agent: str | None) -> None:
        self._write("debug", "http.request.started", {"user_agent": user_agent})

    def completed(self, level: str, fields: dict[str, Any]) -> None:
        self._write(level, "http.request.completed", fields)

    def slow(self, **fields: Any) -> None:
        self._write("warning", "http.request.slow", fields)
