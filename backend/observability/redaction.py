"""The one place that decides what is a secret, for logs, spans, config output and errors.

Contracts:

- Keys. A key (a log field, a mapping key, a header name, a setting name, a
  query or `name=value` parameter) is split into words on `_ . - /`, spaces
  and camelCase humps, lower-cased. It is sensitive when it *names the
  credential itself*, i.e. when its LAST word is one of `CREDENTIAL_WORDS`
  (password, passwd, pwd, passphrase, secret, token, jwt, authorization,
  cookie, credential(s), auth, apikey), or its last two words are one of
  `CREDENTIAL_PAIRS` (secret key, api key, private key, access key, signing
  key, password hash, session id). So `new_password`, `client_secret`,
  `access_token`, `X-Api-Key`, `Set-Cookie`, `SECRET_KEY`, `hashed_password`
  are hidden, while words that merely *mention* a credential stay readable:
  `token_type`, `ACCESS_TOKEN_EXPIRE_MINUTES`, `max_tokens` (plural: a count),
  `password_min_length`, `secretary`, `RATE_LIMIT_KEY_PREFIX`.
  Inside free text and URLs a parameter name may be terser, so there the bare
  words `key`, `sig` and `signature` are sensitive as well (`?key=...`).
- Values (every string, whatever its key) are scanned for: URL userinfo
  (`scheme://user:pass@` keeps the user, `scheme://token@` hides all),
  `name=value` / `name: value` pairs whose name is sensitive (query strings,
  DSN parameters, `password=hunter2` in a message), `Bearer <x>`,
  and SQLAlchemy's `[parameters: ...]` block (statement values: passwords,
  e-mails, borrower ids).
- Hidden values become `REDACTED`; a boolean or None under a sensitive key is
  kept (`generated_password=True` says nothing secret).
- Pure functions, no state: safe from any thread, signal handler or processor.
"""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Status
from opentelemetry.util.types import Attributes, AttributeValue
from structlog.types import EventDict, WrappedLogger

REDACTED = "[REDACTED]"

# Last word of a key that names a credential.
CREDENTIAL_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "token",
        "jwt",
        "authorization",
        "cookie",
        "credential",
        "credentials",
        "auth",
        "apikey",
    }
)
# Last two words of a key that names a credential.
CREDENTIAL_PAIRS = frozenset(
    {
        ("secret", "key"),
        ("api", "key"),
        ("private", "key"),
        ("access", "key"),
        ("signing", "key"),
        ("encryption", "key"),
        ("password", "hash"),
        ("session", "id"),
    }
)
# Additionally sensitive as the last word of a parameter name inside text or a URL.
TEXT_ONLY_WORDS = frozenset({"key", "sig", "signature"})

_CAMEL_HUMP = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[\s_.\-/]+")


def key_words(key: str) -> list[str]:
    """`key` split into lower-case words on `_ . - /`, whitespace and camelCase humps."""
    return [word.lower() for word in _SEPARATORS.split(_CAMEL_HUMP.sub("_", key)) if word]


def _names_credential(words: Sequence[str], *, in_text: bool) -> bool:
    if not words:
        return False
    last = words[-1]
    if last in CREDENTIAL_WORDS or (in_text and last in TEXT_ONLY_WORDS):
        return True
    return len(words) >= 2 and (words[-2], last) in CREDENTIAL_PAIRS


def is_sensitive_key(key: object) -> bool:
    """Whether a mapping key, header or setting name names a credential (see module doc)."""
    if isinstance(key, bytes):
        key = key.decode("latin-1")
    return isinstance(key, str) and _sensitive(key, in_text=False)


def is_sensitive_parameter(name: str) -> bool:
    """Whether a `name=value` parameter inside text or a URL names a credential.

    Broader than `is_sensitive_key`: terse names such as `key` and `sig` count too.
    """
    return _sensitive(name, in_text=True)


# Every log line asks this for each of its ~20 keys, which come from a small set: the
# answer is cached (bounded, since nested mappings may carry client-chosen keys).
@functools.lru_cache(maxsize=4096)
def _sensitive(name: str, *, in_text: bool) -> bool:
    return _names_credential(key_words(name), in_text=in_text)


# scheme://userinfo@ (userinfo without '/', whitespace or '@').
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@?#]+)@")
# `Bearer <credential>` wherever it appears. As the header writes it (capitalised, a
# credential of 8+ characters): "token_type=bearer max_tokens=5" is prose. Basic and
# Digest credentials, and any case, are caught after an authorization name instead.
_BEARER = re.compile(r"\b(?P<scheme>Bearer)\s+(?!\[REDACTED\])[A-Za-z0-9\-._~+/]{8,}=*")
# name=value, name: value, "name": "value" (query strings, DSNs, messages, reprs): the
# head, then the value right after it. Only a sensitive name consumes its value; any
# other head is stepped over, so "failed: password=x" still finds "password=x".
_NAME_HEAD = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9_.\-]*)[\"']?\s*[=:]\s*[\"']?")
_VALUE = re.compile(r"(?!//)(?:(?:Bearer|Basic|Digest|Token)\s+)?[^\s\"'&#,;)}\]]+", re.I)
# SQLAlchemy appends the statement's values to error text: "[parameters: (...)]".
# Everything up to SQLAlchemy's "(Background on this error ...)" line or the end goes:
# values may contain brackets and newlines, so over-hiding is the safe side.
_SQL_PARAMETERS = re.compile(r"\[parameters: .*?(?=\n\(Background|\Z)", re.S)


def _hide_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    if ":" in userinfo:
        return f"{match.group('scheme')}{userinfo.split(':', 1)[0]}:{REDACTED}@"
    # A lone userinfo part is usually a token (https://<token>@host).
    return f"{match.group('scheme')}{REDACTED}@"


def _hide_name_values(text: str) -> str:
    parts: list[str] = []
    position = 0
    for head in _NAME_HEAD.finditer(text):
        if head.start() < position or not is_sensitive_parameter(head.group("name")):
            continue
        value = _VALUE.match(text, head.end())
        if value is None or value.group(0) == REDACTED:
            continue
        parts += [text[position : head.end()], REDACTED]
        position = value.end()
    parts.append(text[position:])
    return "".join(parts)


def redact_text(text: str) -> str:
    """`text` with every credential form of the module doc replaced by `REDACTED`."""
    if "[parameters:" in text:
        text = _SQL_PARAMETERS.sub(f"[parameters: {REDACTED}]", text)
    if "://" in text:
        text = _URL_USERINFO.sub(_hide_userinfo, text)
    if "=" in text or ":" in text:
        text = _hide_name_values(text)
    if "Bearer" not in text:  # the pattern is case-sensitive: nothing to find
        return text
    return _BEARER.sub(lambda m: f"{m.group('scheme')} {REDACTED}", text)


def redact(value: Any) -> Any:
    """A copy of `value` with sensitive keys and credentials in text hidden, at any depth.

    Mappings, lists, tuples, sets and `(name, value)` header pairs are walked;
    strings and bytes are scanned with `redact_text`; other values are returned
    as they are (their `str()` is not inspected: log renderers call
    `redact_value` on whatever they will print).
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {key: redact_item(key, item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        # Header lists: [(name, value), ...] as ASGI and httpx carry them.
        if len(items) == 2 and isinstance(value, tuple | list) and is_sensitive_key(items[0]):
            return (redact(items[0]), REDACTED)
        hidden = [redact(item) for item in items]
        return tuple(hidden) if isinstance(value, tuple) else hidden
    if isinstance(value, bytes | bytearray):
        return redact_text(bytes(value).decode("utf-8", "replace"))
    return value


def redact_item(key: object, value: Any) -> Any:
    """`value` as it may be shown under `key`: hidden when the key names a credential."""
    if is_sensitive_key(key) and value is not None and not isinstance(value, bool):
        return REDACTED
    return redact(value)


def redact_exception(exc: BaseException) -> str:
    """`Type: first line of the message`, redacted: what a span or a client-facing
    diagnostic may say about `exc` (SQL and parameters come on later lines)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return redact_text(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def redact_processor(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: `redact_item` over every key of the event (after exceptions
    have been rendered to data, so their messages and frames are scanned too)."""
    return {key: redact_item(key, value) for key, value in event_dict.items()}


# ------------------------------------------------------------------------ spans

# Longest exception message / stack trace put on an exception event.
EXCEPTION_TEXT_CHARS = 4000


def record_exception(span: Span, exc: BaseException) -> None:
    """Add an exception event for `exc` to `span` with its message and stack trace
    redacted (the SDK's own `record_exception` would copy `str(exc)` verbatim)."""
    if not span.is_recording():
        return
    stack = "".join(traceback.format_exception(exc))
    span.record_exception(
        exc,
        attributes={
            "exception.message": redact_text(str(exc))[:EXCEPTION_TEXT_CHARS],
            "exception.stacktrace": redact_text(stack)[-EXCEPTION_TEXT_CHARS:],
        },
    )


def redact_attributes(attributes: Attributes) -> dict[str, AttributeValue]:
    """Span or event attributes with sensitive keys and credentials in values hidden."""
    hidden: dict[str, AttributeValue] = {}
    for key, value in (attributes or {}).items():
        if is_sensitive_key(key) and not isinstance(value, bool):
            hidden[key] = REDACTED
        elif isinstance(value, str):
            hidden[key] = redact_text(value)
        elif isinstance(value, tuple | list) and all(isinstance(v, str) for v in value):
            hidden[key] = [redact_text(str(v)) for v in value]
        else:
            hidden[key] = value
    return hidden


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """A copy of a finished span whose attributes, events and status description are redacted."""
    status = span.status
    if status.description:
        status = Status(status.status_code, redact_text(status.description))
    events = [
        Event(event.name, redact_attributes(event.attributes), event.timestamp)
        for event in span.events
    ]
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=redact_attributes(span.attributes),
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class RedactingSpanExporter(SpanExporter):
    """Hands `inner` redacted copies of the spans (every exporter of the service is
    wrapped in one, so no attribute, exception event or status leaves unredacted)."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([redact_span(span) for span in spans])

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)
