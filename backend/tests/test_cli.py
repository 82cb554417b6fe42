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
