"""Settings policy: weak secrets and unsafe options refuse to start outside development."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from backend.config import (
    ConfigurationError,
    Settings,
    admin_password_weakness,
    secret_key_weakness,
)

ROOT = Path(__file__).resolve().parents[2]
STRONG = "Tq7mK2vX9pL4wN8rB3zH6jF1sD5gY0cU-eA_tQ8"


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


def test_development_key_is_generated_once_into_a_private_file(tmp_path: Path) -> None:
    key_file = tmp_path / "var" / "secret_key"
    with pytest.warns(UserWarning, match="SECRET_KEY is not set: generated"):
        first = build(ENVIRONMENT="development", SECRET_KEY_FILE=str(key_file))
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text().strip() == first.secret_key
    assert len(first.secret_key) >= 32
    assert secret_key_weakness(first.secret_key) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reusing the file is silent
        second = build(ENVIRONMENT="development", SECRET_KEY_FILE=str(key_file))
    assert second.secret_key == first.secret_key
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["secret_key"]  # no leftovers


def test_development_refuses_an_unusable_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "secret_key"
    key_file.write_text("short\n")
    with pytest.raises(ConfigurationError, match="holds no usable key"):
        build(ENVIRONMENT="development", SECRET_KEY_FILE=str(key_file))


def test_test_environment_key_is_per_process_and_writes_nothing(tmp_path: Path) -> None:
    key_file = tmp_path / "secret_key"
    with pytest.warns(UserWarning, match="SECRET_KEY is not set"):
        first = build(ENVIRONMENT="test", SECRET_KEY_FILE=str(key_file))
    assert len(first.secret_key) >= 32 and not key_file.exists()


def test_production_still_requires_secret_key_even_with_a_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "secret_key"
    key_file.write_text(STRONG)
    with pytest.raises(ConfigurationError, match="SECRET_KEY is not set"):
        build(
            ENVIRONMENT="production",
            SECRET_KEY_FILE=str(key_file),
            DATABASE_URL="postgresql+asyncpg://u@db/app",
        )


WEAK_SECRET_KEYS = [
    "a" * 32,
    "changeme" * 4,
    "secret-key-please-change-this-in-production",
    "Xk9#mP2q" * 4,
    "r8Vq2LmZ0pXw" + "=" * 24,
    "0123456789abcdef" * 2,
    "abababababababababababababababab1",
    "Tq7mK2vX9pL4wN8rB3zH6jF1sD5gY0cU-eA_tQ8"[:20],
]


@pytest.mark.parametrize("key", WEAK_SECRET_KEYS)
def test_secret_key_weakness_rejects_low_entropy_and_placeholder_keys(key: str) -> None:
    assert secret_key_weakness(key) is not None


def test_secret_key_weakness_accepts_generated_keys() -> None:
    for _ in range(2000):
        for key in (secrets.token_hex(16), secrets.token_hex(32), secrets.token_urlsafe(32)):
            assert secret_key_weakness(key) is None, key
    # A random key may spell a placeholder word in mixed case; it is still random.
    assert secret_key_weakness("4dUmMYUBuaHkCSDl-WKy6z6fGeT2TAjK44newI8pK3o") is None


def test_secret_key_weakness_refuses_placeholder_words_in_any_usual_case() -> None:
    for key in (
        "please-change-this-key-before-going-live",
        "PLEASE_CHANGE_THIS_KEY_BEFORE_GOING_LIVE",
        "My-Dummy-Key-For-The-Staging-Environment",
    ):
        assert "placeholder" in (secret_key_weakness(key) or ""), key


@pytest.mark.parametrize(
    ("password", "fragment"),
    [
        ("admin", "at least 12"),
        ("changeme", "at least 12"),
        ("admin-account", "admin username"),
        ("password123456", "common password"),
        ("Administrator", "common password"),
        ("changeme2024!!", "common password"),
        ("aaaaaaaaaaaaaaaa", "distinct"),
    ],
)
def test_admin_password_weakness(password: str, fragment: str) -> None:
    problem = admin_password_weakness(password, "admin-account")
    assert problem is not None and fragment in problem


def test_admin_password_weakness_accepts_a_real_passphrase() -> None:
    assert admin_password_weakness("violet-tractor-harbor-87", "admin") is None


# Each: settings that must stop a production start, and the words of the one line.
PRODUCTION_REFUSALS = [
    ({"ADMIN_PASSWORD": "admin"}, "ADMIN_PASSWORD must be at least 12"),
    ({"ADMIN_PASSWORD": "changeme"}, "ADMIN_PASSWORD must be at least 12"),
    ({"ADMIN_USERNAME": "operator-root", "ADMIN_PASSWORD": "operator-root"}, "admin username"),
    ({"ADMIN_PASSWORD": "password12345678"}, "common password"),
    ({"SECRET_KEY": "a" * 32}, "SECRET_KEY contains a long run"),
    ({"SECRET_KEY": "changeme" * 4}, "SECRET_KEY looks like a placeholder"),
    ({"SECRET_KEY": "Xk9#mP2q" * 4}, "SECRET_KEY is a short chunk repeated"),
    ({"SECRET_KEY": "secret-key-please-change-me-0123456789"}, "placeholder"),
    ({"CORS_ORIGINS": "null"}, "CORS_ORIGINS must not contain 'null'"),
    ({"CORS_ORIGINS": "https://app.example,*"}, "CORS_ORIGINS must not contain '*'"),
    ({"DEBUG": "true"}, "DEBUG must be off"),
]


def production_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env.update(
        ENVIRONMENT="production",
        SECRET_KEY=STRONG,
        ADMIN_PASSWORD="violet-tractor-harbor-87",
        DATABASE_URL="postgresql+asyncpg://u@127.0.0.1:1/app",
    )
    env.update(overrides)
    return env


@pytest.mark.parametrize(("overrides", "fragment"), PRODUCTION_REFUSALS)
def test_production_refusal_stops_the_server_with_one_line(
    overrides: dict[str, str], fragment: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from backend.api.main import app"],
        cwd=ROOT,
        env=production_env(**overrides),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("configuration error: refusing to start in production: ")
    assert fragment in lines[0]
    # The refused value itself is never echoed.
    for name in ("SECRET_KEY", "ADMIN_PASSWORD"):
        if name in overrides:
            assert overrides[name] not in lines[0]


@pytest.mark.parametrize(("overrides", "fragment"), PRODUCTION_REFUSALS[::3])
def test_production_refusal_stops_the_cli_with_one_line(
    overrides: dict[str, str], fragment: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "backend.admin.cli", "migrate"],
        cwd=ROOT,
        env=production_env(**overrides),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: configuration: refusing to start in production")
    assert fragment in lines[0]


def test_production_accepts_the_strong_baseline() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import backend.config as c; c.get_settings(); print('ok')"],
        cwd=ROOT,
        env=production_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


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
    assert (s.LOG_LEVEL, s.LOG_FORMAT, s.REQUEST_TIMEOUT_SECONDS) == ("INFO", "json", 50)
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


def test_every_setting_is_documented_in_readme_and_env_example() -> None:
    env_example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    missing = [
        name
        for name in Settings.model_fields
        if not (f"\n{name}=" in env_example or f"\n# {name}=" in env_example)
        or f"| `{name}` |" not in readme
    ]
    assert missing == []
