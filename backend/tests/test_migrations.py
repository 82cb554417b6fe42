"""Migrations run on empty PostgreSQL and SQLite and agree with the models."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from backend.migrations.runner import downgrade, upgrade
from backend.models import Base
from backend.tests.conftest import TEST_DATABASE_URL

# Named after the test database so parallel suites on other databases never collide.
PIPELINE_TABLES = ("pipeline_runs", "loan_facts", "loan_exceptions")
SCRATCH_DB = f"{make_url(TEST_DATABASE_URL).database}_migrations"


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _inspect(url: str) -> tuple[list[object], set[str]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_diff), await conn.run_sync(_tables)
    finally:
        await engine.dispose()


async def _recreate_database(name: str) -> str:
    admin_url = make_url(TEST_DATABASE_URL).set(database="postgres")
    engine = create_async_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()
    return make_url(TEST_DATABASE_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def scratch_postgres() -> str:
    return asyncio.run(_recreate_database(SCRATCH_DB))


def test_upgrade_empty_postgres_matches_models(scratch_postgres: str) -> None:
    upgrade(scratch_postgres)
    diff, tables = asyncio.run(_inspect(scratch_postgres))
    assert diff == []
    assert {"users", "sales_teams", "alembic_version", *PIPELINE_TABLES} <= tables
    downgrade(scratch_postgres)
    _, tables = asyncio.run(_inspect(scratch_postgres))
    assert tables == {"alembic_version"}
    upgrade(scratch_postgres)


def test_upgrade_empty_sqlite_matches_models(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    upgrade(url)
    diff, tables = asyncio.run(_inspect(url))
    assert diff == []
    assert {"users", "sales_teams", *PIPELINE_TABLES} <= tables
