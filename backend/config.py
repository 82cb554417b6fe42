"""Application settings: one pydantic-settings class read from the environment and `.env`.

Every setting the service understands is a field here, with the default that
`.env.example` and the README document. `get_settings()` returns one cached
instance per process; tests build their own `Settings(...)` and pass it to
`create_app()`.
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backend.observability.redaction import REDACTED, is_sensitive_key, redact, redact_text

Environment = Literal["development", "test", "staging", "production"]

# Values that appear in examples and templates; never acceptable outside development.
PLACEHOLDER_SECRETS = frozenset(
    {
        "",
        "changeme",
        "change-me",
        "changethis",
        "change-this",
        "secret",
        "secret-key",
        "your-secret-key",
        "your-secret-key-here",
        "replace-me",
        "please-change-me",
        "change-me-to-a-long-random-string",
        "development-secret-key",
    }
)
MIN_SECRET_KEY_LENGTH = 32
# Shannon estimate over the key's own characters (length x bits per character):
# `openssl rand -hex 16` scores 118 on average and never below ~88 in 50,000 draws,
# `secrets.token_urlsafe(32)` ~230; 32 characters of 5 symbols score ~74.
MIN_SECRET_KEY_BITS = 80
MIN_SECRET_KEY_DISTINCT = 8
# A run this long of one character is padding or a placeholder, not randomness
# (in 64 random hex characters it happens about once in ten million keys).
MAX_SECRET_KEY_RUN = 8
# Words of template keys ("secret-key-please-change-me"); 5+ letters, so a random
# base64 key contains one by chance about once in 60,000.
PLACEHOLDER_WORDS = (
    "change",
    "please",
    "example",
    "placeholder",
    "replace",
    "secret",
    "sample",
    "dummy",
    "default",
    "insecure",
    "password",
    "development",
)
MIN_ADMIN_PASSWORD_LENGTH = 12
MIN_ADMIN_PASSWORD_DISTINCT = 5
COMMON_PASSWORDS_FILE = Path(__file__).with_name("common_passwords.txt")

# The 50 states and DC: the default ELIGIBILITY_ALLOWED_STATES.
_STATE_CODES = (
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE "
    "NV NH NJ NM NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY"
)
US_STATES = tuple(_STATE_CODES.split())


class ConfigurationError(RuntimeError):
    """The configuration is unsafe or inconsistent; the service must not start."""


def _split_csv(value: object) -> object:
    """Accept a comma-separated string for list settings as well as a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """All configuration of one Loan Engine process."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=True,
    )

    # Application
    APP_NAME: str = "Loan Engine"
    APP_VERSION: str = "0.1.0"
    ENVIRONMENT: Environment = "development"
    DEBUG: bool = False

    # Security / auth
    SECRET_KEY: SecretStr | None = None
    # Development only, when SECRET_KEY is empty: the key generated once into this file
    # (mode 0600) and reused by every process and restart. Ignored elsewhere.
    SECRET_KEY_FILE: str = "./var/secret_key"  # noqa: S105 (a path, not a secret)
    JWT_ALGORITHM: Literal["HS256", "HS384", "HS512"] = "HS256"
    ACCESS_TOKEN_EXPIRE_MINUTES: int = Field(default=30, ge=1, le=7 * 24 * 60)
    BCRYPT_ROUNDS: int = Field(default=12, ge=4, le=16)
    # Self-registration (POST /api/auth/register). Unset, it follows ENVIRONMENT: open
    # in development and test, closed in staging and production, where admins create
    # accounts (`create-user`). Set it to override either way.
    ALLOW_REGISTRATION: bool = Field(
        default_factory=lambda data: data.get("ENVIRONMENT") in ("development", "test")
    )
    CORS_ORIGINS: Annotated[list[str], NoDecode] = Field(default_factory=list)
    TRUSTED_HOSTS: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    TRUSTED_PROXIES: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"]
    )

    # Database
    DATABASE_URL: str = "sqlite+aiosqlite:///./var/loan_engine.db"

    # Storage
    STORAGE_TYPE: Literal["local", "s3"] = "local"
    STORAGE_LOCAL_ROOT: str = "./var/storage"
    S3_BUCKET: str = ""
    S3_PREFIX: str = ""
    S3_REGION: str = "us-east-1"
    S3_ENDPOINT_URL: str | None = None
    MAX_UPLOAD_SIZE_MB: int = Field(default=100, ge=1)

    # Bootstrap admin
    ADMIN_USERNAME: str = "admin"
    ADMIN_EMAIL: str = "admin@example.com"
    ADMIN_PASSWORD: SecretStr | None = None

    # Logging
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    LOG_FORMAT: Literal["json", "text"] = "json"
    LOG_INCLUDE_TIMESTAMP: bool = True

    # Rate limiting
    RATE_LIMIT_ENABLED: bool = True
    RATE_LIMIT_LOGIN: str = "10/minute"
    RATE_LIMIT_REGISTER: str = "5/minute"
    RATE_LIMIT_PIPELINE: str = "5/minute"
    RATE_LIMIT_API: str = "100/minute"
    RATE_LIMIT_UPLOAD: str = "20/minute"

    # Performance
    # Below the ALB's 60 s idle timeout, so the client gets our 504 envelope, not the ALB's.
    REQUEST_TIMEOUT_SECONDS: int = Field(default=50, ge=1)
    SLOW_REQUEST_THRESHOLD_MS: int = Field(default=1000, ge=0)
    MAX_REQUEST_SIZE_MB: int = Field(default=100, ge=1)

    # Database pool
    DB_POOL_SIZE: int = Field(default=10, ge=1)
    DB_MAX_OVERFLOW: int = Field(default=20, ge=0)
    DB_POOL_RECYCLE: int = 3600
    DB_POOL_TIMEOUT: int = Field(default=30, ge=1)
    DB_ECHO_QUERIES: bool = False
    DB_SLOW_QUERY_MS: int = Field(default=500, ge=0)
    # A database that accepts and never answers must cost seconds, not the request timeout.
    DB_CONNECT_TIMEOUT_SECONDS: float = Field(default=5, gt=0, le=60)
    DB_COMMAND_TIMEOUT_SECONDS: float = Field(default=20, gt=0, le=3600)
    # Server-side statement_timeout (0 = none): PostgreSQL cancels what runs longer.
    DB_STATEMENT_TIMEOUT_MS: int = Field(default=15000, ge=0)

    # Health checks
    HEALTH_CHECK_TIMEOUT: int = Field(default=5, ge=1)
    HEALTH_INCLUDE_DETAILS: bool = True

    # Security headers
    ENABLE_SECURITY_HEADERS: bool = True

    # Admin
    ADMIN_DIAGNOSTICS_ENABLED: bool = True

    # Hardening
    # "memory://" keeps counters in this process; "redis://host:6379/0" shares them
    # between every instance that points at the same Redis.
    RATE_LIMIT_STORAGE_URL: str = "memory://"
    # Redis unreachable: true lets requests through unlimited, false answers 503.
    RATE_LIMIT_FAIL_OPEN: bool = True
    RATE_LIMIT_KEY_PREFIX: str = "loan-engine:ratelimit"
    # Abuse blocking (part of rate limiting, counted in its storage): this many failed
    # logins from one client address within the window block it for ABUSE_BLOCK_SECONDS.
    ABUSE_LOGIN_FAILURES: int = Field(default=20, ge=0, le=100000)  # 0: off
    ABUSE_WINDOW_SECONDS: int = Field(default=300, ge=1, le=86400)
    ABUSE_BLOCK_SECONDS: int = Field(default=900, ge=1, le=86400)
    # Longest one rate-limit storage call may take before the fail-open/closed policy applies.
    RATE_LIMIT_STORAGE_TIMEOUT_MS: int = Field(default=250, ge=10, le=10000)
    # Circuit breakers (database, rate-limit storage, broker), per process: this many
    # consecutive failures open one; after the recovery time one probe may try again.
    CIRCUIT_FAILURE_THRESHOLD: int = Field(default=5, ge=1, le=1000)
    CIRCUIT_RECOVERY_SECONDS: float = Field(default=30, gt=0, le=3600)
    # After SIGTERM: readiness answers 503 "draining" this long while requests are
    # still accepted, so the load balancer stops routing before the listener closes.
    SHUTDOWN_DRAIN_DELAY_SECONDS: float = Field(default=0, ge=0, le=60)
    # In-flight requests get this long to finish once the listener is closed.
    SHUTDOWN_GRACE_SECONDS: int = Field(default=30, ge=1)

    @field_validator(
        "RATE_LIMIT_LOGIN",
        "RATE_LIMIT_REGISTER",
        "RATE_LIMIT_PIPELINE",
        "RATE_LIMIT_API",
        "RATE_LIMIT_UPLOAD",
    )
    @classmethod
    def _rate_limit_syntax(cls, value: str) -> str:
        """A typo in a limit must stop start-up, not surface on the first request."""
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(f"expected a rate like '10/minute', got {value!r}") from None
        return value

    # Observability
    # Names follow the OpenTelemetry environment variables so that a collector or
    # AWS set-up documented for OTel applies unchanged.
    OTEL_SERVICE_NAME: str = "loan-engine"
    # otlp | console | none; "otlp" without an endpoint exports nothing.
    OTEL_TRACES_EXPORTER: Literal["otlp", "console", "none"] = "otlp"
    # Metrics over OTLP (to the same endpoint unless OTEL_EXPORTER_OTLP_METRICS_ENDPOINT
    # is set): the path that adds up several workers and tasks.
    OTEL_METRICS_EXPORTER: Literal["otlp", "none"] = "otlp"
    # GET /metrics: this process's series as Prometheus text; refused (503) when the
    # process is one of several uvicorn workers. METRICS_TOKEN, when set, is required
    # as a bearer token.
    METRICS_ENABLED: bool = True
    METRICS_TOKEN: SecretStr = SecretStr("")
    OTEL_EXPORTER_OTLP_ENDPOINT: str = ""
    OTEL_EXPORTER_OTLP_PROTOCOL: Literal["grpc", "http/protobuf"] = "http/protobuf"
    OTEL_PROPAGATORS: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["tracecontext", "baggage", "xray"]
    )
    OTEL_TRACES_SAMPLER: Literal[
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ] = "parentbased_always_on"
    OTEL_TRACES_SAMPLER_ARG: float = Field(default=1.0, ge=0.0, le=1.0)
    # key=value,key=value (e.g. aws.log.group.names=/ecs/loan-engine)
    OTEL_RESOURCE_ATTRIBUTES: str = ""
    OTEL_SHUTDOWN_TIMEOUT_SECONDS: float = Field(default=3.0, gt=0, le=30)
    # Where the API sends people to look at a trace.
    TRACE_UI: Literal["jaeger", "xray"] = "jaeger"
    TRACE_UI_URL: str = "http://localhost:16686"
    AWS_REGION: str = "us-east-1"

    # Pipeline
    PIPELINE_MAX_CONCURRENT_RUNS: int = Field(default=2, ge=1, le=64)
    PIPELINE_BATCH_SIZE: int = Field(default=5000, ge=1, le=100_000)
    PIPELINE_DRAIN_SECONDS: float = Field(default=30, ge=0)
    # Where runs execute: "inprocess" (asyncio tasks in each API process; needs no
    # broker) or "celery" (workers started with `make worker`, through CELERY_BROKER_URL).
    PIPELINE_EXECUTOR: Literal["inprocess", "celery"] = "inprocess"
    # A run is owned through a lease renewed every third of this; an owner silent for
    # longer loses the run, and another process re-queues it.
    PIPELINE_LEASE_SECONDS: float = Field(default=30, ge=1, le=3600)
    # Executions a run may start (the first one included) before it is failed.
    PIPELINE_MAX_ATTEMPTS: int = Field(default=3, ge=1, le=20)
    # Runs waiting to start, over every process; beyond it a new run answers 429.
    PIPELINE_MAX_QUEUED_RUNS: int = Field(default=100, ge=1)
    CELERY_BROKER_URL: str = "redis://127.0.0.1:6379/0"
    # Redis/SQS brokers hand an unacknowledged run to another worker after this long:
    # keep it above the longest run (leases, not redelivery, recover dead workers).
    CELERY_VISIBILITY_TIMEOUT_SECONDS: int = Field(default=4 * 3600, ge=60)
    # Runs one `celery worker` executes at once (its pool processes).
    CELERY_WORKER_CONCURRENCY: int = Field(default=2, ge=1, le=64)
    CELERY_QUEUE: str = "loan-engine.pipeline"
    # Bound on handing a run to the broker; past it the submit answers 503.
    CELERY_PUBLISH_TIMEOUT_SECONDS: float = Field(default=5, gt=0, le=60)

    # Interpreter (backend/runtime.py), applied once start-up is done in every API and
    # worker process: fewer garbage collections that skip start-up's objects, and the
    # event loop takes the GIL back from a computing thread sooner.
    RUNTIME_GC_TUNING: bool = True
    RUNTIME_GIL_SWITCH_INTERVAL_MS: float = Field(default=1.0, gt=0, le=100)
    ELIGIBILITY_MIN_CREDIT_SCORE: int = Field(default=620, ge=300, le=850)
    ELIGIBILITY_MAX_DTI: float = Field(default=0.43, gt=0)
    ELIGIBILITY_MAX_LTV: float = Field(default=0.97, gt=0)
    ELIGIBILITY_MAX_AMOUNT: float = Field(default=766_550, gt=0)
    ELIGIBILITY_ALLOWED_TERMS: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [120, 180, 240, 360]
    )
    ELIGIBILITY_ALLOWED_PROPERTY_TYPES: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["SFR", "CONDO", "TOWNHOUSE", "PUD", "2-4 UNIT"]
    )
    ELIGIBILITY_ALLOWED_STATES: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(US_STATES)
    )

    _split = field_validator(
        "CORS_ORIGINS",
        "TRUSTED_HOSTS",
        "TRUSTED_PROXIES",
        "ELIGIBILITY_ALLOWED_TERMS",
        "ELIGIBILITY_ALLOWED_PROPERTY_TYPES",
        "ELIGIBILITY_ALLOWED_STATES",
        "OTEL_PROPAGATORS",
        mode="before",
    )(_split_csv)

    @field_validator("ELIGIBILITY_ALLOWED_PROPERTY_TYPES", "ELIGIBILITY_ALLOWED_STATES")
    @classmethod
    def _upper_codes(cls, value: list[str]) -> list[str]:
        """Compared against normalized (upper-case) tape values, so stored upper-case."""
        return [item.strip().upper() for item in value if item.strip()]

    @field_validator("DATABASE_URL")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        """Plain `postgresql://` and `sqlite://` URLs get their async driver."""
        if value.startswith("postgresql://") or value.startswith("postgres://"):
            return "postgresql+asyncpg://" + value.split("://", 1)[1]
        if value.startswith("sqlite://"):
            return "sqlite+aiosqlite://" + value.split("://", 1)[1]
        return value

    @model_validator(mode="after")
    def _secret_key_policy(self) -> Settings:
        """Development without SECRET_KEY: the key of SECRET_KEY_FILE (made once);
        test without it: a random key for this process; elsewhere the production
        policy (`production_problems`) or ConfigurationError."""
        key = self.SECRET_KEY.get_secret_value() if self.SECRET_KEY else ""
        if self.ENVIRONMENT == "development":
            if not key:
                self.SECRET_KEY = SecretStr(development_secret_key(Path(self.SECRET_KEY_FILE)))
            return self
        if self.ENVIRONMENT == "test":
            if not key:
                self.SECRET_KEY = SecretStr(secrets.token_urlsafe(48))
                warnings.warn(
                    "SECRET_KEY is not set: using a random key for this process only",
                    stacklevel=2,
                )
            return self
        problems = production_problems(self)
        if problems:
            raise ConfigurationError(
                "refusing to start in " + self.ENVIRONMENT + ": " + "; ".join(problems)
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.DATABASE_URL.startswith("sqlite")

    @property
    def secret_key(self) -> str:
        assert self.SECRET_KEY is not None  # filled in by the validator
        return self.SECRET_KEY.get_secret_value()


def development_secret_key(path: Path) -> str:
    """The development signing key stored in `path`, generated there first if missing.

    Every process reading the same file gets the same key, so tokens survive
    restarts and are accepted by every worker. Creation is race-free: the key is
    written to a private temporary file (mode 0600) and hard-linked into place,
    so concurrent starters either create the file or read a complete one.
    A file that exists but holds no usable key is a ConfigurationError.
    """
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secrets.token_urlsafe(48) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)
        created = True
    except FileExistsError:
        created = False  # another process was first: use its key
    finally:
        temporary.unlink()
    if created:
        warnings.warn(
            f"SECRET_KEY is not set: generated a development key into {path} "
            "(kept for later starts; set SECRET_KEY outside development)",
            stacklevel=3,
        )
    return _read_key_file(path)


def _read_key_file(path: Path) -> str:
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < MIN_SECRET_KEY_LENGTH:
        raise ConfigurationError(
            f"SECRET_KEY_FILE {path} holds no usable key: delete it to generate a new one"
        )
    return key


def _longest_run(text: str) -> int:
    longest = run = 0
    previous = ""
    for char in text:
        run = run + 1 if char == previous else 1
        previous = char
        longest = max(longest, run)
    return longest


def _smallest_period(text: str) -> int:
    """The shortest p such that `text` is a p-character chunk repeated (the last copy
    possibly cut short); len(text) when it repeats nothing."""
    for period in range(1, len(text) // 2 + 1):
        if all(text[i] == text[i - period] for i in range(period, len(text))):
            return period
    return len(text)


def entropy_bits(text: str) -> float:
    """Estimated entropy of `text`: its length times the Shannon entropy of its
    own character distribution (a sample estimate: low for repeats and few symbols)."""
    if not text:
        return 0.0
    counts = Counter(text)
    per_char = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    return per_char * len(text)


def secret_key_weakness(key: str) -> str | None:
    """Why `key` is not fit to sign production tokens, or None when it is."""
    if not key:
        return "SECRET_KEY is not set"
    lowered = key.strip().lower()
    if lowered in PLACEHOLDER_SECRETS:
        return "SECRET_KEY is a known placeholder value"
    if len(key) < MIN_SECRET_KEY_LENGTH:
        return f"SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters"
    # Written as a word (lower, UPPER or Title case): a random key of mixed case can
    # spell one by chance ("4dUmMYUB"), and that key is fine.
    word = next(
        (w for w in PLACEHOLDER_WORDS if any(f in key for f in (w, w.upper(), w.title()))),
        None,
    )
    if word is not None:
        return f"SECRET_KEY looks like a placeholder (contains {word!r})"
    if _longest_run(key) >= MAX_SECRET_KEY_RUN:
        return "SECRET_KEY contains a long run of one character (padding?)"
    if _smallest_period(key) <= len(key) // 2:
        return "SECRET_KEY is a short chunk repeated"
    if len(set(key)) < MIN_SECRET_KEY_DISTINCT:
        return f"SECRET_KEY uses fewer than {MIN_SECRET_KEY_DISTINCT} distinct characters"
    bits = entropy_bits(key)
    if bits < MIN_SECRET_KEY_BITS:
        return (
            f"SECRET_KEY has too little entropy (~{bits:.0f} bits, "
            f"{MIN_SECRET_KEY_BITS} needed): use `openssl rand -hex 32`"
        )
    return None


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The lower-cased common passwords of `common_passwords.txt` (one a line, # comments)."""
    lines = COMMON_PASSWORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(
        line.strip().lower() for line in lines if line.strip() and not line.startswith("#")
    )


def admin_password_weakness(password: str, username: str) -> str | None:
    """Why `password` must not guard the bootstrap admin in production, or None.

    Refused: shorter than 12; the username (any case, also reversed); fewer than
    5 distinct characters; on the common list, also once trailing digits and
    punctuation are removed ("password123456", "admin2024!!!!").
    """
    lowered = password.lower()
    if len(password) < MIN_ADMIN_PASSWORD_LENGTH:
        return f"ADMIN_PASSWORD must be at least {MIN_ADMIN_PASSWORD_LENGTH} characters"
    if lowered in (username.lower(), username.lower()[::-1]):
        return "ADMIN_PASSWORD must not be the admin username"
    if len(set(password)) < MIN_ADMIN_PASSWORD_DISTINCT:
        return f"ADMIN_PASSWORD needs at least {MIN_ADMIN_PASSWORD_DISTINCT} distinct characters"
    stem = lowered.rstrip("0123456789!@#$%^&*()-_=+.,?~ ")
    common = common_passwords()
    if lowered in common or stem in common or (stem and stem == username.lower()):
        return "ADMIN_PASSWORD is a common password"
    return None


def production_problems(settings: Settings) -> list[str]:
    """Reasons this configuration is unsafe for staging or production (empty when safe)."""
    problems: list[str] = []
    key = settings.SECRET_KEY.get_secret_value() if settings.SECRET_KEY else ""
    key_problem = secret_key_weakness(key)
    if key_problem:
        problems.append(key_problem)
    if settings.ADMIN_PASSWORD is not None and settings.ADMIN_PASSWORD.get_secret_value():
        password_problem = admin_password_weakness(
            settings.ADMIN_PASSWORD.get_secret_value(), settings.ADMIN_USERNAME
        )
        if password_problem:
            problems.append(password_problem)
    if settings.DEBUG:
        problems.append("DEBUG must be off")
    # Credentials are always allowed: "*" or "null" would hand them to any page
    # (null: sandboxed iframes, file:// pages, redirects).
    unsafe = [o for o in settings.CORS_ORIGINS if o.strip().lower() in ("*", "null")]
    if unsafe:
        problems.append(f"CORS_ORIGINS must not contain {unsafe[0]!r} (credentials are allowed)")
    if settings.is_sqlite:
        problems.append("DATABASE_URL must not be SQLite")
    return problems


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def config_summary(settings: Settings) -> dict[str, object]:
    """The effective configuration, safe to log or show: a setting that names a
    credential (`redaction.is_sensitive_key`) only as "[REDACTED]" / "<not set>";
    every other value with credentials in text (URL userinfo, password-like
    query parameters) redacted."""
    summary: dict[str, object] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if is_sensitive_key(name):
            summary[name] = REDACTED if value else "<not set>"
        elif isinstance(value, str):
            summary[name] = redact_text(value)
        else:
            summary[name] = redact(value)
    return summary
