"""Run Alembic migrations from code (CLI, entrypoint, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import String, column, inspect, select, table
from sqlalchemy.engine import Connection

ROOT = Path(__file__).resolve().parents[2]
# Alembic's default; env.py does not change it.
VERSION_TABLE = "alembic_version"


def alembic_config(database_url: str | None = None) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "backend" / "migrations"))
    config.attributes["configure_logging"] = False
    if database_url:
        config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def head_revisions() -> tuple[str, ...]:
    """The revision ids at the head of the migration scripts (one unless branched)."""
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(connection: Connection) -> tuple[str, ...]:
    """The revisions the database behind `connection` is stamped with (empty when none)."""
    # Read directly rather than through MigrationContext, which logs at info on every use.
    if not inspect(connection).has_table(VERSION_TABLE):
        return ()
    version_num = column("version_num", String)
    rows = connection.execute(select(version_num).select_from(table(VERSION_TABLE, version_num)))
    return tuple(rows.scalars())
