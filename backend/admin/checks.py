"""The operator's `check`: is this configuration ready to serve, dependency by dependency.

Each check answers PASS (works), WARN (works, but something is not configured
or not as it should be for several processes) or FAIL (will not work). Every
check is bounded by its own time limit and they run concurrently, so the whole
report takes about as long as the slowest check, never more than the bound.
A check never raises: whatever goes wrong becomes its FAIL line, with the
error's type and first line (credentials removed).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from backend.admin.service import database_status
from backend.config import ConfigurationError, Settings
from backend.observability.redaction import redact_text
from backend.storage import Storage, create_storage

# Written and deleted by the storage check: a valid `inputs/` path no upload can take
# (sanitized upload names never start with a dot).
PROBE_PREFIX = "inputs/.check-"
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
REDIS_SCHEMES = ("redis", "rediss")
# What an AMQP 0-9-1 client sends first; a broker answers with a method frame (type 1).
AMQP_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class Verdict(StrEnum):
    PASS = "PASS"  # noqa: S105 (a verdict, not a password)
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the report: `detail` says what was checked and what was found."""

    name: str
    verdict: Verdict
    detail: str
    seconds: float = 0.0


# (verdict, detail) of one check; the runner adds its name and time.
Outcome = tuple[Verdict, str]


def overall(results: list[CheckResult]) -> Verdict:
    """The worst verdict of the report (PASS for an empty one)."""
    verdicts = {result.verdict for result in results}
    for verdict in (Verdict.FAIL, Verdict.WARN):
        if verdict in verdicts:
            return verdict
    return Verdict.PASS


def describe(exc: BaseException) -> str:
    """An error in one line: type and first line of its message, credentials removed."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return redact_text(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)


def check_settings(settings: Settings, refusal: str | None) -> Outcome:
    """FAIL when ENVIRONMENT refuses the configuration (`refusal`, the reason); WARN in
    development and test when production would refuse it; PASS otherwise."""
    if refusal is not None:
        return Verdict.FAIL, refusal
    if settings.ENVIRONMENT in ("staging", "production"):
        return Verdict.PASS, f"valid for {settings.ENVIRONMENT}"
    try:
        # The same sources (environment, .env) read under production's rules.
        Settings(ENVIRONMENT="production")
    except ConfigurationError as exc:
        return Verdict.WARN, f"valid for {settings.ENVIRONMENT}; {exc}"
    except ValueError as exc:  # pydantic's ValidationError; the real settings passed it
        return Verdict.WARN, f"valid for {settings.ENVIRONMENT}; {describe(exc)}"
    return Verdict.PASS, f"valid for {settings.ENVIRONMENT} (and for production)"


async def check_database(settings: Settings, limit_seconds: float) -> Outcome:
    """Reachable and at the Alembic head (the `db-status` probe)."""
    status = await database_status(settings, limit_seconds=limit_seconds)
    where = f"{status.dialect} {status.url}"
    if not status.reachable:
        return Verdict.FAIL, f"{where}: unreachable: {status.error}"
    current = ", ".join(status.current_revisions) or "none"
    if not status.at_head:
        head = ", ".join(status.head_revisions)
        return Verdict.FAIL, f"{where}: at revision {current}, head is {head}: run `migrate`"
    return Verdict.PASS, f"{where}: {status.latency_ms} ms, at head ({current})"


def bounded_storage(settings: Settings, limit_seconds: float) -> Storage:
    """The configured storage, with S3 calls bounded by `limit_seconds` and not retried:
    boto3 blocks a thread, which a cancelled check would otherwise leave running."""
    if settings.STORAGE_TYPE != "s3":
        return create_storage(settings)
    import boto3
    from botocore.config import Config

    from backend.storage.s3 import S3Storage

    client = boto3.client(
        "s3",
        region_name=settings.S3_REGION,
        endpoint_url=settings.S3_ENDPOINT_URL or None,
        config=Config(
            connect_timeout=limit_seconds, read_timeout=limit_seconds, retries={"max_attempts": 1}
        ),
    )
    return S3Storage(settings.S3_BUCKET, prefix=settings.S3_PREFIX, client=client)


async def _probe_bytes() -> AsyncIterator[bytes]:
    yield b"loan-engine check\n"


async def check_storage(settings: Settings, limit_seconds: float) -> Outcome:
    """A probe file written through the storage backend and deleted again."""
    if settings.STORAGE_TYPE == "s3":
        where = f"s3://{settings.S3_BUCKET}/{settings.S3_PREFIX}".rstrip("/")
    else:
        where = f"local {settings.STORAGE_LOCAL_ROOT}"
    storage = bounded_storage(settings, limit_seconds)
    path = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        await storage.save(path, _probe_bytes())
        await storage.delete(path)
    finally:
        await storage.close()
    return Verdict.PASS, f"{where}: writable"


async def redis_ping(url: str, limit_seconds: float) -> None:
    """PING the Redis at `url`; raises when it does not answer."""
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=limit_seconds, socket_timeout=limit_seconds)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def tcp_connect(host: str, port: int) -> None:
    _reader, writer = await asyncio.open_connection(host, port)
    writer.close()
    await writer.wait_closed()


async def amqp_handshake(host: str, port: int) -> None:
    """Open an AMQP 0-9-1 connection as far as the broker's first frame (Connection.Start)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(AMQP_PROTOCOL_HEADER)
        await writer.drain()
        first = await reader.readexactly(1)
    finally:
        writer.close()
    if first != b"\x01":
        raise ConnectionError("the server does not speak AMQP 0-9-1")


async def check_rate_limit_storage(settings: Settings, limit_seconds: float) -> Outcome:
    """Redis PING when RATE_LIMIT_STORAGE_URL is Redis; WARN when limits are per process."""
    url = settings.RATE_LIMIT_STORAGE_URL
    if not settings.RATE_LIMIT_ENABLED:
        return Verdict.PASS, "not used (RATE_LIMIT_ENABLED=false)"
    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        return Verdict.WARN, (
            f"not configured: {scheme}:// counts limits in each process separately"
        )
    await redis_ping(url, limit_seconds)
    return Verdict.PASS, f"{redact_text(url)}: PING answered"


async def check_broker(settings: Settings, limit_seconds: float) -> Outcome:
    """The Celery broker answers when PIPELINE_EXECUTOR=celery (Redis PING, AMQP handshake)."""
    if settings.PIPELINE_EXECUTOR != "celery":
        return Verdict.PASS, f"not used (PIPELINE_EXECUTOR={settings.PIPELINE_EXECUTOR})"
    url = settings.CELERY_BROKER_URL
    parts = urlsplit(url)
    shown = redact_text(url)
    if parts.scheme in REDIS_SCHEMES:
        await redis_ping(url, limit_seconds)
        return Verdict.PASS, f"{shown}: PING answered"
    if parts.scheme in AMQP_SCHEMES:
        default_port = 5671 if parts.scheme == "amqps" else 5672
        if parts.scheme == "amqps":
            # TLS in front of AMQP: a TCP connection is as far as this check goes.
            await tcp_connect(parts.hostname or "localhost", parts.port or default_port)
            return Verdict.PASS, f"{shown}: TCP connection accepted"
        await amqp_handshake(parts.hostname or "localhost", parts.port or default_port)
        return Verdict.PASS, f"{shown}: AMQP connection started"
    return Verdict.WARN, f"{shown}: the {parts.scheme}:// transport is not checked"


async def check_collector(settings: Settings, limit_seconds: float) -> Outcome:
    """The OTLP collector answers when OTEL_EXPORTER_OTLP_ENDPOINT is set: an empty
    export over HTTP (a 2xx means it takes traces), a TCP connection for gRPC."""
    endpoint = settings.OTEL_EXPORTER_OTLP_ENDPOINT.rstrip("/")
    if settings.OTEL_TRACES_EXPORTER != "otlp":
        return Verdict.PASS, f"not used (OTEL_TRACES_EXPORTER={settings.OTEL_TRACES_EXPORTER})"
    if not endpoint:
        return Verdict.WARN, "not configured: OTEL_EXPORTER_OTLP_ENDPOINT is empty, no spans leave"
    parts = urlsplit(endpoint)
    if settings.OTEL_EXPORTER_OTLP_PROTOCOL == "grpc":
        port = parts.port or (443 if parts.scheme == "https" else 4317)
        await tcp_connect(parts.hostname or "localhost", port)
        return Verdict.PASS, f"{endpoint} (gRPC): TCP connection accepted"
    import httpx

    async with httpx.AsyncClient(timeout=limit_seconds) as client:
        response = await client.post(
            f"{endpoint}/v1/traces",
            content=b"",  # an ExportTraceServiceRequest with no spans
            headers={"Content-Type": "application/x-protobuf"},
        )
    if response.is_success:
        return Verdict.PASS, f"{endpoint}: accepts traces (HTTP {response.status_code})"
    return Verdict.WARN, f"{endpoint}: reachable, but /v1/traces answered {response.status_code}"


async def _timed(name: str, check: Awaitable[Outcome], limit_seconds: float) -> CheckResult:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit_seconds):
            verdict, detail = await check
    except TimeoutError:
        verdict, detail = Verdict.FAIL, f"no answer within {limit_seconds:g} s"
    except Exception as exc:  # a failing dependency is a FAIL line, not a crash
        verdict, detail = Verdict.FAIL, describe(exc)
    return CheckResult(name, verdict, detail, round(time.perf_counter() - started, 3))


CHECKS: tuple[tuple[str, Callable[[Settings, float], Awaitable[Outcome]]], ...] = (
    ("database", check_database),
    ("storage", check_storage),
    ("rate-limit storage", check_rate_limit_storage),
    ("broker", check_broker),
    ("otlp collector", check_collector),
)


async def run_checks(
    settings: Settings, refusal: str | None, limit_seconds: float
) -> list[CheckResult]:
    """Every check, concurrently, each within `limit_seconds`; settings first.

    `refusal` is why the process settings were refused (None when they were
    not); `settings` are then a stand-in that lets the other checks run.
    """
    verdict, detail = check_settings(settings, refusal)
    results = [CheckResult("settings", verdict, detail)]
    results += await asyncio.gather(
        *(_timed(name, check(settings, limit_seconds), limit_seconds) for name, check in CHECKS)
    )
    return results
