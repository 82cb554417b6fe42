"""Rate limiting on /api/* with the `limits` library (pure ASGI).

Rules come from settings: login and register per client IP, pipeline runs and
uploads per user, every other /api/* request per user (else per IP). Counting
uses the sliding-window-counter strategy, in process memory by default or in
Redis (RATE_LIMIT_STORAGE_URL=redis://...) so several instances share one limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.auth.security import InvalidToken, decode_access_token
from backend.config import Settings
from backend.errors import error_response
from backend.middleware.client_ip import TrustedProxies, client_ip
from backend.middleware.request_start import route_of
from backend.observability import metrics as app_metrics
from backend.resilience import CircuitBreaker

logger = structlog.get_logger(__name__)
T = TypeVar("T")

# Connection set-up to Redis; each whole storage call is bounded by
# RATE_LIMIT_STORAGE_TIMEOUT_MS as well.
REDIS_CONNECT_TIMEOUT_SECONDS = 0.5
# The memory backend is for one instance; past this many counters it starts over
# rather than grow without bound (a flood from many addresses).
MEMORY_MAX_KEYS = 100_000


@dataclass(frozen=True)
class Rule:
    """One limit: which requests it covers and how the caller is identified."""

    name: str
    limit: RateLimitItem
    per_user: bool


@dataclass
class Decision:
    rule: Rule
    allowed: bool
    remaining: int
    reset_at: float
    # The client is blocked for abuse (too many failed logins) until `reset_at`.
    blocked: bool = False


def storage_uri(url: str) -> str:
    """The `limits` async storage URI for RATE_LIMIT_STORAGE_URL."""
    if url in ("", "memory", "memory://"):
        return "async+memory://"
    if url.startswith(("redis://", "rediss://")):
        return "async+" + url
    return url


class RateLimiter:
    """Rules, storage and the outage bookkeeping of one application."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.fail_open = settings.RATE_LIMIT_FAIL_OPEN
        self.uri = storage_uri(settings.RATE_LIMIT_STORAGE_URL)
        self.is_memory = self.uri.startswith("async+memory")
        # Built on first use, inside the running event loop the client will belong to.
        self._storage: Storage | None = None
        self._strategy: SlidingWindowCounterRateLimiter | None = None
        self.rules = {
            "login": Rule("login", parse(settings.RATE_LIMIT_LOGIN), per_user=False),
            "register": Rule("register", parse(settings.RATE_LIMIT_REGISTER), per_user=False),
            "pipeline": Rule("pipeline", parse(settings.RATE_LIMIT_PIPELINE), per_user=True),
            "upload": Rule("upload", parse(settings.RATE_LIMIT_UPLOAD), per_user=True),
            "api": Rule("api", parse(settings.RATE_LIMIT_API), per_user=True),
        }
        self.timeout = settings.RATE_LIMIT_STORAGE_TIMEOUT_MS / 1000
        self.breaker = CircuitBreaker(
            "rate_limit_storage",
            settings.CIRCUIT_FAILURE_THRESHOLD,
            settings.CIRCUIT_RECOVERY_SECONDS,
        )
        self.storage_errors = 0
        self.abuse_failures = settings.ABUSE_LOGIN_FAILURES
        self.abuse_window = settings.ABUSE_WINDOW_SECONDS
        self.abuse_block = settings.ABUSE_BLOCK_SECONDS
        self.blocked_clients = 0
        self.rejected = 0

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            options: dict[str, float | str] = {}
            if not self.is_memory:
                # redis-py's asyncio client: it honours cancellation, so the
                # per-call timeout below really frees the request.
                options = {
                    "implementation": "redispy",
                    "key_prefix": self.settings.RATE_LIMIT_KEY_PREFIX,
                    "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
                    "socket_timeout": self.timeout,
                }
            storage = storage_from_string(self.uri, **options)
            assert isinstance(storage, Storage)
            self._storage = storage
        return self._storage

    @property
    def strategy(self) -> SlidingWindowCounterRateLimiter:
        if self._strategy is None:
            self._strategy = SlidingWindowCounterRateLimiter(self.storage)
        return self._strategy

    def rule_for(self, method: str, path: str) -> Rule | None:
        """The rule covering this request; None for anything outside /api/."""
        if not path.startswith("/api/"):
            return None  # health, docs, metrics and static files are never limited
        route = path.rstrip("/")
        if method == "POST":
            if route == "/api/auth/login":
                return self.rules["login"]
            if route == "/api/auth/register":
                return self.rules["register"]
            if route == "/api/pipeline/run":
                return self.rules["pipeline"]
            if route == "/api/files/upload":
                return self.rules["upload"]
        return self.rules["api"]

    def identity(self, scope: Scope, rule: Rule, client: str) -> str:
        """`user:<id>` from a verified bearer token when the rule is per user, else
        `ip:<client>` (the client address, resolved once by the caller)."""
        if rule.per_user:
            user = self._verified_subject(scope)
            if user is not None:
                return f"user:{user}"
        return f"ip:{client}"

    def _verified_subject(self, scope: Scope) -> str | None:
        # This runs before FastAPI's dependencies, so it checks the signature and
        # expiry itself: an unverified token must never pick somebody else's bucket.
        authorization = Headers(scope=scope).get("authorization")
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            return str(decode_access_token(self.settings, token.strip())["sub"])
        except InvalidToken:
            return None

    async def warm_up(self) -> None:
        """Build the storage client and load its scripts at start-up, so the first
        request's call fits the storage timeout; a storage that is down is not an error
        here (requests meet the policy)."""
        self.strategy  # noqa: B018 - building it imports the client and makes the pool
        if self.is_memory:
            return
        try:
            async with asyncio.timeout(REDIS_CONNECT_TIMEOUT_SECONDS * 4):
                await self.strategy.get_window_stats(self.rules["api"].limit, "warm-up")
        except Exception as exc:
            logger.warning("ratelimit.storage.warm_up_failed", error_type=type(exc).__name__)

    async def check(self, rule: Rule, identity: str, client: str) -> Decision | None:
        """Count one request; None when the storage is unavailable (see `fail_open`).

        A client blocked for abuse gets a refusal (`blocked`) without being counted."""

        async def decide() -> Decision:
            if self.is_memory:
                await self._bound_memory()
            if self.abuse_failures:
                blocked_until = await self._blocked_until(client)
                if blocked_until:
                    return Decision(rule, False, 0, blocked_until, blocked=True)
            allowed = await self.strategy.hit(rule.limit, rule.name, identity)
            stats = await self.strategy.get_window_stats(rule.limit, rule.name, identity)
            return Decision(rule, allowed, max(0, stats.remaining), stats.reset_time)

        return await self._guarded(decide)

    async def _blocked_until(self, client: str) -> float:
        key = f"abuse:blocked:{client}"
        if not await self.storage.get(key):
            return 0.0
        return float(await self.storage.get_expiry(key))

    async def login_failed(self, client: str) -> None:
        """Count a failed login from `client`; at ABUSE_LOGIN_FAILURES within
        ABUSE_WINDOW_SECONDS (whatever the usernames, in every process sharing the
        storage) the client is blocked for ABUSE_BLOCK_SECONDS, with one warning."""

        async def count() -> None:
            failures = await self.storage.incr(f"abuse:failures:{client}", self.abuse_window)
            # Exactly one process sees the count reach the threshold (INCR is atomic).
            if failures == self.abuse_failures:
                await self.storage.incr(f"abuse:blocked:{client}", self.abuse_block)
                await self.storage.clear(f"abuse:failures:{client}")
                self.blocked_clients += 1
                logger.warning(
                    "abuse.client.blocked",
                    client_ip=client,
                    failed_logins=failures,
                    window_seconds=self.abuse_window,
                    block_seconds=self.abuse_block,
                )

        if self.abuse_failures:
            await self._guarded(count)

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call()` on the storage within the storage timeout and behind the breaker;
        None when refused or failed (counted in `storage_errors`)."""
        if not self.breaker.allow():
            self._count_error()
            return None
        try:
            async with asyncio.timeout(self.timeout):
                result = await call()
        except asyncio.CancelledError:
            self.breaker.release()
            raise
        except Exception as exc:  # any storage failure: the policy decides, never a 500
            self._count_error()
            self.breaker.failure(exc)
            logger.debug("ratelimit.storage.failed", error_type=type(exc).__name__)
            return None
        self.breaker.success()
        return result

    def _count_error(self) -> None:
        self.storage_errors += 1
        app_metrics.ratelimit_storage_errors.add(1)

    async def _bound_memory(self) -> None:
        # limits' MemoryStorage keeps counters in `storage`, their deadlines in
        # `expirations`, a lock per key in `locks` (and moving-window entries in
        # `events`). Read them by type, not getattr: a renamed attribute must fail
        # here, not silently leave the store unbounded.
        storage = self.storage
        assert isinstance(storage, MemoryStorage)
        keys = max(len(storage.storage), len(storage.expirations), len(storage.events))
        if keys > MEMORY_MAX_KEYS:
            logger.warning("ratelimit.memory.reset", keys=keys)
            await storage.reset()

    async def close(self) -> None:
        """Release the storage connection (Redis) at shutdown, within the storage timeout."""
        if self._storage is None:
            return
        bridge = getattr(self._storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        closing = getattr(client, "aclose", None)
        if closing is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await closing()


def outcome(decision: Decision | None) -> str:
    """The `outcome` label of a decision: allowed, rejected, blocked or unavailable."""
    if decision is None:
        return "unavailable"
    if decision.blocked:
        return "blocked"
    return "allowed" if decision.allowed else "rejected"


def rate_limit_headers(decision: Decision, now: float) -> dict[str, str]:
    """X-RateLimit-* plus the IETF RateLimit / RateLimit-Policy fields."""
    limit = decision.rule.limit
    reset_in = max(0, math.ceil(decision.reset_at - now))
    window = limit.get_expiry()
    name = decision.rule.name
    return {
        "X-RateLimit-Limit": str(limit.amount),
        "X-RateLimit-Remaining": str(decision.remaining),
        "X-RateLimit-Reset": str(math.ceil(now + reset_in)),
        "RateLimit-Policy": f'"{name}";q={limit.amount};w={window}',
        "RateLimit": f'"{name}";r={decision.remaining};t={reset_in}',
    }


class RateLimitMiddleware:
    """Contract: requests under /api/* are counted against their rule. Allowed
    requests get the rate-limit headers on their response; over the limit ->
    429 `rate_limited` envelope with the same headers plus Retry-After. Storage
    unavailable -> requests pass unlimited (fail open) or 503 (fail closed)."""

    def __init__(
        self, app: ASGIApp, *, limiter: RateLimiter, trusted_proxies: TrustedProxies
    ) -> None:
        self.app = app
        self.limiter = limiter
        self.trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The route template when one matched (the same value the span and logs carry).
        rule = self.limiter.rule_for(
            scope.get("method", "GET"), route_of(scope) or scope.get("path", "")
        )
        if rule is None or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return

        client = client_ip(scope, self.trusted_proxies)
        identity = self.limiter.identity(scope, rule, client)
        decision = await self.limiter.check(rule, identity, client)
        app_metrics.ratelimit_decisions.add(1, {"rule": rule.name, "outcome": outcome(decision)})
        if decision is None:
            if self.limiter.fail_open:
                await self.app(scope, receive, send)
                return
            response = error_response(
                503, "service_unavailable", "Rate limiting is temporarily unavailable"
            )
            await response(scope, receive, send)
            return

        now = time.time()
        if decision.blocked:
            retry_after = max(1, math.ceil(decision.reset_at - now))
            response = error_response(
                429,
                "client_blocked",
                "Too many failed logins from this address; try again later",
                details={"retry_after_seconds": retry_after},
                headers={"Retry-After": str(retry_after)},
            )
            await response(scope, receive, send)
            return
        headers = rate_limit_headers(decision, now)
        if not decision.allowed:
            self.limiter.rejected += 1
            retry_after = max(1, math.ceil(decision.reset_at - now))
            logger.warning("ratelimit.exceeded", rule=rule.name, key_kind=identity.split(":")[0])
            response = error_response(
                429,
                "rate_limited",
                "Too many requests",
                details={"rule": rule.name, "retry_after_seconds": retry_after},
                headers={**headers, "Retry-After": str(retry_after)},
            )
            await response(scope, receive, send)
            return

        status = 0

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = MutableHeaders(scope=message)
                for name, value in headers.items():
                    response_headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
        if status == 401 and rule.name == "login":
            # Counted once the answer is out: the client never waits for it.
            await self.limiter.login_failed(client)
