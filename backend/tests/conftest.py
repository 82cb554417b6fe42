"""Shared fixtures: the real PostgreSQL test database, an app per test, HTTP clients.

Every test that uses the database starts from empty tables (TRUNCATE), so tests
never see each other's rows. PostgreSQL unreachable is a hard failure, never a skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi import FastAPI
from jose import jwt
from moto.server import ThreadedMotoServer
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from backend.api.main import create_app
from backend.config import Settings
from backend.migrations.runner import upgrade
from backend.models import Base

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
TEST_BROKER_URL = os.environ.get("TEST_CELERY_BROKER_URL", "redis://127.0.0.1:6379/13")
ADMIN_PASSWORD = "admin-password-for-tests"
TEST_SECRET = "Tq7mK2vX9pL4wN8rB3zH6jF1sD5gY0cU-eA_tQ8"
# Files of the apps and servers tests build without naming a folder of their own: one
# temporary folder per test process (removed at its end), never the repository's ./var.
TEST_FILES_ROOT = Path(tempfile.mkdtemp(prefix="loan-engine-tests-"))
TEST_STORAGE_ROOT = str(TEST_FILES_ROOT / "storage")


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(TEST_FILES_ROOT, ignore_errors=True)


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test app: PostgreSQL, fast hashing, no rate limits unless asked."""
    values: dict[str, Any] = {
        "ENVIRONMENT": "test",
        "SECRET_KEY": TEST_SECRET,
        "DATABASE_URL": TEST_DATABASE_URL,
        "BCRYPT_ROUNDS": 4,
        "ADMIN_USERNAME": "admin",
        "ADMIN_EMAIL": "admin@example.com",
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "RATE_LIMIT_ENABLED": False,
        "DB_POOL_SIZE": 5,
        "DB_MAX_OVERFLOW": 5,
        # One test process builds hundreds of apps: freezing the collector at each start
        # would keep their cyclic garbage forever. Server subprocesses keep the default.
        "RUNTIME_GC_TUNING": False,
        "STORAGE_LOCAL_ROOT": TEST_STORAGE_ROOT,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


async def _reset_schema(url: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def migrated_database() -> str:
    """The test database, emptied and migrated to head once per run."""
    try:
        asyncio.run(_reset_schema(TEST_DATABASE_URL))
    except Exception as exc:
        pytest.exit(
            f"PostgreSQL is not reachable at TEST_DATABASE_URL={TEST_DATABASE_URL}: "
            f"{type(exc).__name__}: {exc}",
            returncode=1,
        )
    upgrade(TEST_DATABASE_URL)
    return TEST_DATABASE_URL


async def truncate_all(url: str) -> None:
    names = ", ".join(f'"{t.name}"' for t in reversed(Base.metadata.sorted_tables))
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()


@pytest.fixture
async def clean_db(migrated_database: str) -> str:
    await truncate_all(migrated_database)
    return migrated_database


@pytest.fixture
def broker() -> Iterator[str]:
    """The test broker (a Redis database), emptied before and after the test."""
    client = redis.Redis.from_url(TEST_BROKER_URL)
    client.flushdb()
    try:
        yield TEST_BROKER_URL
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def settings(clean_db: str, tmp_path: Path) -> Settings:
    # Local storage under the test's own folder: never the repository's ./var.
    return make_settings(DATABASE_URL=clean_db, STORAGE_LOCAL_ROOT=str(tmp_path / "storage"))


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    """Collects the spans of an app built with `create_app(settings, span_exporter=exporter)`."""
    return InMemorySpanExporter()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.10", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def login(client: httpx.AsyncClient, username: str, password: str) -> str:
    response = await client.post(
        "/api/auth/login", data={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def admin_headers(client: httpx.AsyncClient) -> dict[str, str]:
    return bearer(await login(client, "admin", ADMIN_PASSWORD))


UserFactory = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture
def make_user(client: httpx.AsyncClient, admin_headers: dict[str, str]) -> UserFactory:
    """Register a user, give it a role (and `sales_team_id=` a team), and return its
    id, headers and password."""
    counter = iter(range(1, 10_000))

    async def factory(role: str = "viewer", **fields: Any) -> dict[str, Any]:
        n = next(counter)
        username = fields.get("username", f"{role}{n}")
        password = fields.get("password", f"password-{role}-{n}-long")
        response = await client.post(
            "/api/auth/register",
            json={"username": username, "email": f"{username}@example.com", "password": password},
        )
        assert response.status_code == 202, response.text
        token = await login(client, username, password)
        # The token names the user (`sub`): no extra request, which some tests would count.
        user_id = int(jwt.get_unverified_claims(token)["sub"])
        changes = {k: v for k, v in fields.items() if k == "sales_team_id"}
        if role != "viewer":
            changes["role"] = role
        if changes:
            patched = await client.patch(
                f"/api/users/{user_id}", json=changes, headers=admin_headers
            )
            assert patched.status_code == 200, patched.text
        return {"id": user_id, "username": username, "password": password, "headers": bearer(token)}

    return factory


async def make_team(client: httpx.AsyncClient, admin_headers: dict[str, str], name: str) -> int:
    """Create a sales team through the API; its id."""
    response = await client.post("/api/teams", json={"name": name}, headers=admin_headers)
    assert response.status_code == 201, response.text
    team_id: int = response.json()["id"]
    return team_id


@pytest.fixture
async def analyst(make_user: UserFactory) -> dict[str, str]:
    headers: dict[str, str] = (await make_user("analyst"))["headers"]
    return headers


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 HTTP API (moto's standalone server) on a free local port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket on the moto server; boto3 finds its credentials in the env."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"loan-engine-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket=name)
    client.close()
    return name


@pytest.fixture(autouse=True)
async def no_runner_left_behind() -> AsyncIterator[None]:
    """The event loop lives for the whole session: a pipeline runner whose app was never
    shut down would keep sweeping expired leases in later tests. Fail the test that
    leaves one (and stop it, so later tests do not inherit it)."""
    yield
    leaked = [
        task
        for task in asyncio.all_tasks()
        if task.get_name() == "pipeline-recovery" and not task.done()
    ]
    for task in leaked:
        task.cancel()
    assert not leaked, f"{len(leaked)} pipeline recovery loop(s) still running"
