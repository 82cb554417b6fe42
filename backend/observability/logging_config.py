"""Structured logging: one structlog + stdlib configuration per process.

Every line, whether it comes from `structlog.get_logger()` or from a standard
library logger (uvicorn, sqlalchemy, asyncpg, opentelemetry, ...), goes through
the same processors and the same handler on stdout, so all lines share one
shape:

    timestamp, level, logger, event, service, version, environment,
    + the log context (request_id, method, route, client_ip, user, user_id, ...)
    + trace_id / span_id / xray_trace_id of the span active when the line is written
    + the call's own keys

Secrets never leave this module: keys that name a credential and credentials
embedded in URLs are replaced by "[REDACTED]" at any depth, after exceptions
have been turned into data (so exception messages are scrubbed as well).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

import orjson
import structlog
from opentelemetry import trace
from structlog.types import EventDict, Processor, WrappedLogger

from backend.config import Settings

REDACTED = "[REDACTED]"

# A key is sensitive when its name contains one of these (case-insensitive).
_SENSITIVE_KEY = re.compile(
    r"pass(word|wd|phrase)|secret|token|authorization|cookie|api[-_]?key|credential"
    r"|private[-_]?key|session[-_]?id",
    re.IGNORECASE,
)
# scheme://user:password@host -> scheme://user:[REDACTED]@host; scheme://token@host too.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@]+)@")
# ?token=...&password=... in query strings and DSN parameters.
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:[^=&\s]*(?:pass(?:word|wd)?|secret|token|api[-_]?key|credential|sig)"
    r"[^=&\s]*))=(?P<value>[^&\s#]*)",
    re.IGNORECASE,
)

# Libraries that are chatty at INFO; raised to WARNING unless SQL echo is wanted.
NOISY_LOGGERS = ("uvicorn.access", "sqlalchemy.engine", "httpx", "httpcore", "botocore")
# Loggers that some servers configure with their own handlers: ours replace them.
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error")

_configured_key: tuple[Any, ...] | None = None


def _redact_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    if ":" in userinfo:
        user = userinfo.split(":", 1)[0]
        return f"{match.group('scheme')}{user}:{REDACTED}@"
    # A lone userinfo part is usually a token (https://<token>@host).
    return f"{match.group('scheme')}{REDACTED}@"


def redact_text(text: str) -> str:
    """`text` with credentials inside URLs, DSNs and query strings replaced."""
    if "://" in text:
        text = _URL_USERINFO.sub(_redact_userinfo, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}={REDACTED}", text)
    return text


def is_sensitive_key(key: object) -> bool:
    """Whether a mapping key names a credential."""
    if isinstance(key, bytes):
        key = key.decode("latin-1")
    return isinstance(key, str) and _SENSITIVE_KEY.search(key) is not None


def redact(value: Any) -> Any:
    """A copy of `value` with sensitive keys and URL credentials redacted, at any depth."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: _redact_item(k, v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        # Header lists: [(name, value), ...] as ASGI and httpx carry them.
        if (
            len(items) == 2
            and not isinstance(value, set | frozenset)
            and is_sensitive_key(items[0])
        ):
            return (redact(items[0]), REDACTED)
        redacted = [redact(item) for item in items]
        return tuple(redacted) if isinstance(value, tuple) else redacted
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    return value


def _redact_item(key: object, value: Any) -> Any:
    # A flag or an absent value cannot carry a secret (`generated_password=True` stays).
    if is_sensitive_key(key) and value is not None and not isinstance(value, bool):
        return REDACTED
    return redact(value)


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: run `redact` over the whole event."""
    return {key: _redact_item(key, value) for key, value in event_dict.items()}


def format_trace_ids(trace_id: int, span_id: int) -> dict[str, str]:
    """The log fields for a span: W3C hex ids and the X-Ray form of the trace id."""
    hex_trace = format(trace_id, "032x")
    return {
        "trace_id": hex_trace,
        "span_id": format(span_id, "016x"),
        "xray_trace_id": f"1-{hex_trace[:8]}-{hex_trace[8:]}",
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
    global _configured_key
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
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
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
        logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
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
