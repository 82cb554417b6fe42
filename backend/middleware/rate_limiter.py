"""Rate limiting on /api/* with the `limits` library (pure ASGI).

Rules come from settings: login and register per client IP, pipeline runs and
uploads per user, every other /api/* request per user (else per IP). Counting
uses the sliding-window-counter strategy, in process memory by default or in
Redis (RATE_LIMIT_STORAGE_URL=redis://...) so several instances share one limit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string
from opentelemetry import metrics
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.auth.security import InvalidToken, decode_access_token
from backend.config import Settings
from backend.errors import error_response
from backend.middleware.client_ip import TrustedProxies, client_ip

logger = structlog.get_logger(__name__)
meter = metrics.get_meter(__name__)
storage_errors_counter = meter.create_counter(
    "ratelimit.storage.errors", description="Rate-limit storage calls that failed"
)
rejected_counter = meter.create_counter(
    "ratelimit.rejected", description="Requests answered 429 by the rate limiter"
)

# While the storage is down it is retried at most this often; in between, the
# fail-open/closed policy answers at once instead of every request paying a timeout.
STORAGE_RETRY_SECONDS = 2.0
# Redis calls must not hold a request up for long when Redis is slow or gone.
REDIS_TIMEOUT_SECONDS = 0.5
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
        self.outage_since: float | None = None
        self.last_attempt = 0.0
        self.storage_errors = 0
        self.rejected = 0

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            options: dict[str, float | str] = {}
            if not self.is_memory:
                options = {
                    "key_prefix": self.settings.RATE_LIMIT_KEY_PREFIX,
                    "connect_timeout": REDIS_TIMEOUT_SECONDS,
                    "stream_timeout": REDIS_TIMEOUT_SECONDS,
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

    def identity(self, scope: Scope, rule: Rule, trusted: TrustedProxies) -> str:
        """`user:<id>` from a verified bearer token when the rule is per user, else `ip:<addr>`."""
        if rule.per_user:
            user = self._verified_subject(scope)
            if user is not None:
                return f"user:{user}"
        return f"ip:{client_ip(scope, trusted)}"

    def _verified_subject(self, scope: Scope) -> str | None:
        # This runs before FastAPI's dependencies, so it checks the signature and
        # expiry itself: an unverified token must never pick somebody else's bucket.
        for key, value in scope.get("headers", ()):
            if key.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    return None
                try:
                    return str(decode_access_token(self.settings, token.strip())["sub"])
                except InvalidToken:
                    return None
        return None

    async def check(self, rule: Rule, identity: str) -> Decision | None:
        """Count one request; None when the storage is unavailable (see `fail_open`)."""
        now = time.monotonic()
        if self.outage_since is not None and now - self.last_attempt < STORAGE_RETRY_SECONDS:
            self._count_error()
            return None
        self.last_attempt = now
        try:
            if self.is_memory:
                await self._bound_memory()
            allowed = await self.strategy.hit(rule.limit, rule.name, identity)
            stats = await self.strategy.get_window_stats(rule.limit, rule.name, identity)
        except Exception as exc:  # any storage failure: the policy decides, never a 500
            self._storage_failed(exc)
            return None
        if self.outage_since is not None:
            logger.warning(
                "ratelimit.storage.recovered",
                outage_seconds=round(now - self.outage_since, 1),
                failed_requests=self.storage_errors,
            )
            self.outage_since = None
        return Decision(rule, allowed, max(0, stats.remaining), stats.reset_time)

    def _count_error(self) -> None:
        self.storage_errors += 1
        storage_errors_counter.add(1)

    def _storage_failed(self, exc: Exception) -> None:
        self._count_error()
        if self.outage_since is None:
            # One line per outage; the counter keeps the per-request tally.
            self.outage_since = time.monotonic()
            logger.warning(
                "ratelimit.storage.unavailable",
                error_type=type(exc).__name__,
                fail_open=self.fail_open,
            )

    async def _bound_memory(self) -> None:
        counters = getattr(self.storage, "storage", None)
        if counters is not None and len(counters) > MEMORY_MAX_KEYS:
            logger.warning("ratelimit.memory.reset", keys=len(counters))
            await self.storage.reset()

    async def close(self) -> None:
        """Release the storage connection (Redis) at shutdown."""
        if self._storage is None:
            return
        bridge = getattr(self._storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        if client is not None and hasattr(client, "connection_pool"):
            client.connection_pool.disconnect()


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
        rule = self.limiter.rule_for(scope.get("method", "GET"), scope.get("path", ""))
        if rule is None or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return

        identity = self.limiter.identity(scope, rule, self.trusted_proxies)
        decision = await self.limiter.check(rule, identity)
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
        headers = rate_limit_headers(decision, now)
        if not decision.allowed:
            rejected_counter.add(1, {"rule": rule.name})
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

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in headers.items():
                    response_headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
