"""The admin CLI as an operator runs it: a separate process on the default SQLite setup."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend.admin.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_then_seed_admin_once(tmp_path: Path) -> None:
    db = tmp_path / "nested" / "cli.db"
    env = {
        **os.environ,
        "ENVIRONMENT": "development",
        "DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "ADMIN_USERNAME": "root-admin",
        "ADMIN_PASSWORD": "",
        "BCRYPT_ROUNDS": "4",
        # The development signing key is generated once: under the test's folder.
        "SECRET_KEY_FILE": str(tmp_path / "secret_key"),
    }
    assert cli("migrate", env=env).returncode == 0

    first = cli("seed-admin", env=env)
    assert first.returncode == 0, first.stderr
    assert "Admin account created: username=root-admin password=" in first.stderr
    password = first.stderr.split("password=")[1].split()[0]
    assert len(password) >= 16

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT username, role FROM users").fetchall()
    assert rows == [("root-admin", "admin")]

    second = cli("seed-admin", env=env)
    assert second.returncode == 0
    assert "already exists" in second.stderr
    assert "password=" not in second.stderr + second.stdout


def test_generate_tape_is_reproducible(tmp_path: Path) -> None:
    env = {**os.environ, "ENVIRONMENT": "development"}
    paths = [tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"]
    for path, seed in zip(paths, ("7", "7", "8"), strict=True):
        result = cli("generate-tape", "--rows", "2000", "--out", str(path), "--seed", seed, env=env)
        assert result.returncode == 0, result.stderr
    first, second, third = (p.read_bytes() for p in paths)
    assert first == second
    assert first != third
    lines = first.decode().splitlines()
    assert lines[0].split(",")[:3] == ["loan_id", "borrower_id", "amount"]
    assert len(lines) == 2001


def test_generate_tape_shares(tmp_path: Path) -> None:
    import csv

    from backend.pipeline.tape import REQUIRED_COLUMNS

    out = tmp_path / "t.csv"
    env = {**os.environ, "ENVIRONMENT": "development"}
    result = cli(
        "generate-tape", "--rows", "4000", "--out", str(out),
        "--ineligible-share", "0.25", "--malformed-share", "0.1", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with out.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == REQUIRED_COLUMNS
    short = sum(1 for r in rows[1:] if len(r) != len(REQUIRED_COLUMNS))
    # About 1 in 6 malformed rows is a short row; the rest carry a bad value.
    assert 30 < short < 110
    bad = cli("generate-tape", "--rows", "1", "--out", str(out),
              "--ineligible-share", "0.8", "--malformed-share", "0.5", env=env)  # fmt: skip
    assert bad.returncode == 2


async def test_migrations_started_together_apply_once(tmp_path: Path) -> None:
    """Containers that start together each run `migrate` (RUN_MIGRATIONS=true): on an
    empty PostgreSQL database one applies the migrations and the others wait for it,
    then find nothing to do. None of them fails."""
    import uuid

    from sqlalchemy import make_url, text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from backend.migrations.runner import head_revisions
    from backend.tests.conftest import TEST_DATABASE_URL

    name = f"migrate_{uuid.uuid4().hex[:12]}"
    server = create_async_engine(
        make_url(TEST_DATABASE_URL).set(database="postgres"),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
    )
    async with server.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(TEST_DATABASE_URL).set(database=name).render_as_string(hide_password=False)
    env = {**os.environ, "ENVIRONMENT": "test", "DATABASE_URL": url}
    try:
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "backend.admin.cli", "migrate"],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        outcomes = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in processes]
        assert [code for code, _ in outcomes] == [0, 0, 0], outcomes
        database = create_async_engine(url, poolclass=NullPool)
        try:
            async with database.connect() as conn:
                versions = (
                    await conn.execute(text("SELECT version_num FROM alembic_version"))
                ).all()
        finally:
            await database.dispose()
        assert tuple(row[0] for row in versions) == head_revisions()
    finally:
        async with server.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await server.dispose()
