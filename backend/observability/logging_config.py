"""Structured logging: one structlog + stdlib configuration per process.

Every line, whether it comes from `structlog.get_logger()` or from a standard
library logger (uvicorn, sqlalchemy, asyncpg, opentelemetry, ...), goes through
the same processors and the same handler on stdout, so all lines share one
shape:

    timestamp, level, logger, event, service, version, environment,
    + the log context (request_id, method, route, client_ip, user, user_id, ...)
    + trace_id / span_id / xray_trace_id of the span active when the line is written
    + the call's own keys

Secrets never leave this module: every line, structlog's or a stdlib record,
goes through `redaction.redact_processor` after exceptions have been turned
into data (so exception messages and SQLAlchemy's parameter blocks are
scrubbed as well). Database drivers never log below INFO (their DEBUG lines
carry statement parameters), nor does `sqlalchemy.engine` (DEBUG prints result
rows); DB_ECHO_QUERIES logs statements through this handler, one JSON line each.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import orjson
import structlog
from opentelemetry import trace
from opentelemetry.trace import format_span_id, format_trace_id
from structlog.types import EventDict, Processor, WrappedLogger

from backend.config import Settings
from backend.observability.redaction import redact_processor
from backend.observability.trace_ids import xray_trace_id

# Libraries that are chatty at INFO; raised to WARNING unless SQL echo is wanted.
NOISY_LOGGERS = ("uvicorn.access", "sqlalchemy.engine", "httpx", "httpcore", "botocore")
# Loggers whose records below INFO print statement parameters or result rows: never
# written, whatever LOG_LEVEL says (levels raised, and a handler filter as a backstop).
PARAMETER_LOGGERS = ("aiosqlite", "asyncpg", "sqlalchemy.engine")
# Loggers that some servers configure with their own handlers: ours replace them.
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error")

_configured_key: tuple[Any, ...] | None = None
# The handler every line goes through; direct lines (the access line) share its lock.
_handler: logging.StreamHandler[Any] | None = None


def format_trace_ids(trace_id: int, span_id: int) -> dict[str, str]:
    """The log fields for a span: W3C hex ids and the X-Ray form of the trace id."""
    hex_trace = format_trace_id(trace_id)
    return {
        "trace_id": hex_trace,
        "span_id": format_span_id(span_id),
        "xray_trace_id": xray_trace_id(hex_trace),
    }


def add_trace_context(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Stamp the ids of the span active in the calling context (none outside a span)."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        for key, value in format_trace_ids(ctx.trace_id, ctx.span_id).items():
            event_dict.setdefault(key, value)
    return event_dict


def _static_fields(settings: Settings) -> Processor:
    fields = {
        "service": settings.OTEL_SERVICE_NAME,
        "version": settings.APP_VERSION,
        "environment": settings.ENVIRONMENT,
    }

    def add_static_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add_static_fields


def _orjson_default(value: Any) -> str:
    return str(value)


_LEADING_KEYS = ("timestamp", "level", "logger", "event")


def render_json(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> str:
    """One JSON object, one line; anything orjson cannot encode becomes its `str()`."""
    # The fixed keys first, so a line reads well in a terminal as well as in a query.
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return orjson.dumps(ordered, default=_orjson_default, option=orjson.OPT_NON_STR_KEYS).decode()


class _Stdout:
    """A stream that is whatever `sys.stdout` is at write time.

    Test runners swap `sys.stdout` per test; a handler bound to the object seen at
    configuration time would keep writing to a stale stream.
    """

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


def _shared_processors(settings: Settings) -> list[Processor]:
    # Run for both structlog calls and stdlib records, before the formatter.
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
    ]
    if settings.LOG_INCLUDE_TIMESTAMP:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"))
    processors += [add_trace_context, _static_fields(settings)]
    return processors


def direct_renderer(settings: Settings) -> Callable[[str, str, dict[str, Any]], str]:
    """Render a line as the handler would, minus the stdlib round trip (JSON format only).

    The same processors in the same order (context, level, logger name, timestamp,
    trace ids, static fields, redaction, JSON), for hot paths that write plain
    fields (no exception, no stack) once per request.
    """
    context: list[Processor] = [structlog.contextvars.merge_contextvars]
    if settings.LOG_INCLUDE_TIMESTAMP:
        context.append(structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"))
    context += [add_trace_context, _static_fields(settings), redact_processor]

    def render(logger_name: str, level: str, event_dict: dict[str, Any]) -> str:
        event_dict["level"] = level
        event_dict["logger"] = logger_name
        for processor in context:
            event_dict = processor(None, level, event_dict)  # type: ignore[assignment]
        return render_json(None, level, event_dict)

    return render


def write_line(line: str) -> None:
    """Write one rendered line to the log stream, under the handler's lock."""
    handler = _handler
    if handler is None:
        sys.stdout.write(line + "\n")
        return
    with handler.lock or contextlib.nullcontext():
        handler.stream.write(line + "\n")
        handler.stream.flush()


def build_formatter(settings: Settings) -> structlog.stdlib.ProcessorFormatter:
    """The formatter that renders every record (structlog or stdlib) in the configured format."""
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if settings.LOG_FORMAT == "json":
        final += [
            structlog.processors.StackInfoRenderer(),
            # Exceptions as data (type, value, frames); locals never, they hold secrets.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            redact_processor,
            render_json,
        ]
    else:
        final += [
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_processor,
            structlog.dev.ConsoleRenderer(colors=_isatty(sys.stdout)),
        ]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            *_shared_processors(settings),
            structlog.stdlib.ExtraAdder(),
            _drop_server_extras,
        ],
        processors=final,
    )


class DropParameterRecords(logging.Filter):
    """Handler filter: drops records below INFO from `PARAMETER_LOGGERS` (and children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        name = record.name
        return not any(name == p or name.startswith(p + ".") for p in PARAMETER_LOGGERS)


def _drop_server_extras(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    # uvicorn attaches an ANSI-coloured copy of each message; the plain one is enough.
    event_dict.pop("color_message", None)
    return event_dict


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Configure structlog and the stdlib root logger for this process.

    Idempotent: a second call with the same settings does nothing, so every
    `create_app()` may call it. Different settings (tests) reconfigure.
    `stream` replaces stdout (tests); by default lines go to the current stdout.
    """
    global _configured_key, _handler
    key = (
        settings.LOG_LEVEL,
        settings.LOG_FORMAT,
        settings.LOG_INCLUDE_TIMESTAMP,
        settings.DB_ECHO_QUERIES,
        settings.OTEL_SERVICE_NAME,
        settings.APP_VERSION,
        settings.ENVIRONMENT,
        id(stream) if stream is not None else None,
    )
    if key == _configured_key:
        return
    level = logging.getLevelName(settings.LOG_LEVEL)

    handler = logging.StreamHandler(stream if stream is not None else _Stdout())
    handler.setFormatter(build_formatter(settings))
    handler.set_name("loan-engine")
    handler.addFilter(DropParameterRecords())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(level)

    # Servers install their own handlers; one handler (the root's) means one line per record.
    for name in _SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True
        server_logger.setLevel(logging.NOTSET)
    for name in NOISY_LOGGERS:
        noisy = logging.getLogger(name)
        noisy.setLevel(logging.WARNING)
    if settings.DB_ECHO_QUERIES:
        # Statements through our handler (never `echo=True`, whose own handler prints
        # plain-text duplicates); INFO, not DEBUG, which would add result rows.
        logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
    for name in ("aiosqlite", "asyncpg"):
        driver = logging.getLogger(name)
        driver.setLevel(max(level, logging.INFO))
    # Python warnings (e.g. the generated development SECRET_KEY) become log lines.
    logging.captureWarnings(True)

    structlog.configure(
        processors=[
            *_shared_processors(settings),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Calls below the level return at once: no context merge, no rendering.
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Caching pins a logger to the configuration of its first use; tests switch
        # configurations between apps, so only real processes cache.
        cache_logger_on_first_use=settings.ENVIRONMENT != "test",
    )
    _configured_key = key


@contextmanager
def warnings_held_for_logging() -> Iterator[list[warnings.WarningMessage]]:
    """Hold the warnings raised in the block (e.g. while reading settings, before logging
    exists); `replay_warnings` then issues them again, as log lines once configured."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        yield caught


def replay_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Show held warnings through the current `warnings.showwarning` (logging, once configured)."""
    for held in caught:
        warnings.showwarning(held.message, held.category, held.filename, held.lineno)
