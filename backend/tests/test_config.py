"""Settings policy: weak secrets and unsafe options refuse to start outside development."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from backend.config import ConfigurationError, Settings

ROOT = Path(__file__).resolve().parents[2]
STRONG = "k" * 40


def build(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize("key", [None, "", "changeme", "your-secret-key-here", "short-key-123"])
def test_production_refuses_weak_secret_key(key: str | None) -> None:
    values: dict[str, object] = {
        "ENVIRONMENT": "production",
        "DATABASE_URL": "postgresql+asyncpg://u@db/app",
    }
    if key is not None:
        values["SECRET_KEY"] = key
    with pytest.raises((ConfigurationError, ValidationError), match="SECRET_KEY"):
        build(**values)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"DEBUG": True}, "DEBUG"),
        ({"CORS_ORIGINS": "*"}, "CORS_ORIGINS"),
        ({"DATABASE_URL": "sqlite+aiosqlite:///./x.db"}, "SQLite"),
    ],
)
def test_staging_refuses_unsafe_options(extra: dict[str, object], fragment: str) -> None:
    values = {
        "ENVIRONMENT": "staging",
        "SECRET_KEY": STRONG,
        "DATABASE_URL": "postgresql+asyncpg://u@db/app",
    }
    with pytest.raises((ConfigurationError, ValidationError), match=fragment):
        build(**{**values, **extra})


def test_production_accepts_strong_settings() -> None:
    settings = build(
        ENVIRONMENT="production", SECRET_KEY=STRONG, DATABASE_URL="postgresql://u@db/app"
    )
    assert settings.DATABASE_URL == "postgresql+asyncpg://u@db/app"
    assert settings.secret_key == STRONG


def test_development_generates_random_key_with_warning() -> None:
    with pytest.warns(UserWarning, match="SECRET_KEY is not set"):
        first = build(ENVIRONMENT="development")
    with pytest.warns(UserWarning, match="SECRET_KEY is not set"):
        second = build(ENVIRONMENT="development")
    assert len(first.secret_key) >= 32
    assert first.secret_key != second.secret_key


def test_defaults_match_spec() -> None:
    s = build(ENVIRONMENT="test", SECRET_KEY=STRONG)
    assert s.DATABASE_URL.startswith("sqlite+aiosqlite:///")
    assert (s.DB_POOL_SIZE, s.DB_MAX_OVERFLOW, s.DB_POOL_RECYCLE, s.DB_POOL_TIMEOUT) == (
        10,
        20,
        3600,
        30,
    )
    assert (s.RATE_LIMIT_LOGIN, s.RATE_LIMIT_API) == ("10/minute", "100/minute")
    assert (s.LOG_LEVEL, s.LOG_FORMAT, s.REQUEST_TIMEOUT_SECONDS) == ("INFO", "json", 300)
    assert s.CORS_ORIGINS == []


def test_list_settings_accept_comma_separated_values() -> None:
    s = build(
        ENVIRONMENT="test", SECRET_KEY=STRONG, CORS_ORIGINS="https://a.example, https://b.example"
    )
    assert s.CORS_ORIGINS == ["https://a.example", "https://b.example"]


def test_server_start_refused_with_clear_message() -> None:
    env = {
        **os.environ,
        "ENVIRONMENT": "production",
        "SECRET_KEY": "changeme",
        "DATABASE_URL": "postgresql+asyncpg://u@127.0.0.1:1/app",
    }
    result = subprocess.run(
        [sys.executable, "-c", "from backend.api.main import app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "refusing to start in production" in result.stderr
    assert "SECRET_KEY is a known placeholder value" in result.stderr
