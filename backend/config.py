"""Application settings: one pydantic-settings class read from the environment and `.env`.

Every setting the service understands is a field here, with the default that
`.env.example` and the README document. `get_settings()` returns one cached
instance per process; tests build their own `Settings(...)` and pass it to
`create_app()`.
"""

from __future__ import annotations

import secrets
import warnings
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
    JWT_ALGORITHM: Literal["HS256", "HS384", "HS512"] = "HS256"
    ACCESS_TOKEN_EXPIRE_MINUTES: int = Field(default=30, ge=1, le=7 * 24 * 60)
    BCRYPT_ROUNDS: int = Field(default=12, ge=4, le=16)
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
    REQUEST_TIMEOUT_SECONDS: int = Field(default=300, ge=1)
    SLOW_REQUEST_THRESHOLD_MS: int = Field(default=1000, ge=0)
    MAX_REQUEST_SIZE_MB: int = Field(default=100, ge=1)

    # Database pool
    DB_POOL_SIZE: int = Field(default=10, ge=1)
    DB_MAX_OVERFLOW: int = Field(default=20, ge=0)
    DB_POOL_RECYCLE: int = 3600
    DB_POOL_TIMEOUT: int = Field(default=30, ge=1)
    DB_ECHO_QUERIES: bool = False
    DB_SLOW_QUERY_MS: int = Field(default=500, ge=0)

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
        key = self.SECRET_KEY.get_secret_value() if self.SECRET_KEY else ""
        if self.ENVIRONMENT in ("development", "test"):
            if not key:
                self.SECRET_KEY = SecretStr(secrets.token_urlsafe(48))
                warnings.warn(
                    "SECRET_KEY is not set: using a random key for this process only; "
                    "tokens will not survive a restart",
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


def production_problems(settings: Settings) -> list[str]:
    """Reasons this configuration is unsafe for staging or production (empty when safe)."""
    problems: list[str] = []
    key = settings.SECRET_KEY.get_secret_value() if settings.SECRET_KEY else ""
    if not key:
        problems.append("SECRET_KEY is not set")
    elif key.strip().lower() in PLACEHOLDER_SECRETS:
        problems.append("SECRET_KEY is a known placeholder value")
    elif len(key) < MIN_SECRET_KEY_LENGTH:
        problems.append(f"SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters")
    if settings.DEBUG:
        problems.append("DEBUG must be off")
    if "*" in settings.CORS_ORIGINS:
        problems.append("CORS_ORIGINS must not be '*' (credentials are allowed)")
    if settings.is_sqlite:
        problems.append("DATABASE_URL must not be SQLite")
    return problems


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def _hide_url_password(url: str) -> str:
    """`url` with any password replaced by ***, so it can be logged."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def config_summary(settings: Settings) -> dict[str, object]:
    """The effective configuration, safe to log: secrets shown only as set / not set."""
    summary: dict[str, object] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            summary[name] = "***" if value.get_secret_value() else "<not set>"
        elif value is None and name in ("SECRET_KEY", "ADMIN_PASSWORD"):
            summary[name] = "<not set>"
        elif name.endswith("_URL") and isinstance(value, str):
            summary[name] = _hide_url_password(value)
        else:
            summary[name] = value
    return summary
