"""The embedded SQLite default works end to end for register and login."""

from __future__ import annotations

from pathlib import Path

import httpx

from backend.api.main import create_app
from backend.migrations.runner import upgrade
from backend.tests.conftest import ADMIN_PASSWORD, bearer, login, make_settings


async def test_register_and_login_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    import anyio

    await anyio.to_thread.run_sync(upgrade, url)
    app = create_app(make_settings(DATABASE_URL=url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            created = await client.post(
                "/api/auth/register",
                json={
                    "username": "lite",
                    "email": "lite@example.com",
                    "password": "sqlite-pass-123",
                },
            )
            assert created.status_code == 202
            duplicate = await client.post(
                "/api/auth/register",
                json={"username": "lite", "email": "x@example.com", "password": "sqlite-pass-123"},
            )
            # A taken name answers like a new one, and changes nothing.
            assert (duplicate.status_code, duplicate.json()) == (202, created.json())
            token = await login(client, "lite", "sqlite-pass-123")
            me = await client.get("/api/auth/me", headers=bearer(token))
            assert me.json()["username"] == "lite"
            admin_token = await login(client, "admin", ADMIN_PASSWORD)
            users = await client.get("/api/users", headers=bearer(admin_token))
            assert users.json()["total"] == 2
