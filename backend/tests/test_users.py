"""Users administration: roles, pagination, updates."""

from __future__ import annotations

import httpx
import pytest

from backend.tests.conftest import UserFactory
from backend.tests.test_auth import assert_envelope


async def test_list_users_requires_admin(client: httpx.AsyncClient, make_user: UserFactory) -> None:
    viewer = await make_user()
    analyst = await make_user("analyst")
    assert_envelope(await client.get("/api/users"), 401, "unauthorized")
    assert_envelope(await client.get("/api/users", headers=viewer["headers"]), 403, "forbidden")
    assert_envelope(await client.get("/api/users", headers=analyst["headers"]), 403, "forbidden")


async def test_list_users_paginates(
    client: httpx.AsyncClient, make_user: UserFactory, admin_headers: dict[str, str]
) -> None:
    for _ in range(4):
        await make_user()
    page = (await client.get("/api/users?limit=2&offset=1", headers=admin_headers)).json()
    assert page["total"] == 5
    assert page["limit"] == 2 and page["offset"] == 1
    assert [u["username"] for u in page["items"]] == ["viewer1", "viewer2"]
    default = (await client.get("/api/users", headers=admin_headers)).json()
    assert default["limit"] == 50 and len(default["items"]) == 5
    for bad in ("limit=0", "limit=101", "offset=-1", "limit=abc"):
        response = await client.get(f"/api/users?{bad}", headers=admin_headers)
        assert_envelope(response, 422, "validation_error")


async def test_patch_user(
    client: httpx.AsyncClient, make_user: UserFactory, admin_headers: dict[str, str]
) -> None:
    user = await make_user()
    response = await client.patch(
        f"/api/users/{user['id']}", json={"role": "analyst"}, headers=admin_headers
    )
    assert response.status_code == 200
    assert response.json()["role"] == "analyst"
    me = await client.get("/api/auth/me", headers=user["headers"])
    assert me.json()["role"] == "analyst"


async def test_patch_user_errors(
    client: httpx.AsyncClient, make_user: UserFactory, admin_headers: dict[str, str]
) -> None:
    user = await make_user()
    path = f"/api/users/{user['id']}"
    assert_envelope(
        await client.patch(path, json={"role": "emperor"}, headers=admin_headers),
        422,
        "validation_error",
    )
    assert_envelope(
        await client.patch(path, json={"password": "x"}, headers=admin_headers),
        422,
        "validation_error",
    )
    assert_envelope(
        await client.patch(path, json={"sales_team_id": 12345}, headers=admin_headers),
        400,
        "bad_request",
    )
    assert_envelope(
        await client.patch("/api/users/424242", json={"role": "viewer"}, headers=admin_headers),
        404,
        "not_found",
    )
    assert_envelope(
        await client.patch("/api/users/99999999999999", json={}, headers=admin_headers),
        422,
        "validation_error",
    )
    assert_envelope(
        await client.patch(path, json={"role": "admin"}, headers=user["headers"]),
        403,
        "forbidden",
    )


async def test_admin_cannot_lock_themselves_out(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    me = (await client.get("/api/auth/me", headers=admin_headers)).json()
    for change in ({"is_active": False}, {"role": "viewer"}):
        response = await client.patch(f"/api/users/{me['id']}", json=change, headers=admin_headers)
        assert_envelope(response, 409, "conflict")


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_seed_refuses_production_without_admin_password(clean_db: str) -> None:
    from backend.config import ConfigurationError
    from backend.database import Database
    from backend.tests.conftest import TEST_SECRET, make_settings
    from backend.users.service import ensure_admin

    settings = make_settings(
        ENVIRONMENT="production", SECRET_KEY=TEST_SECRET, ADMIN_PASSWORD=None, DATABASE_URL=clean_db
    )
    database = Database(settings)
    try:
        with pytest.raises(ConfigurationError, match="ADMIN_PASSWORD"):
            async with database.session() as session:
                await ensure_admin(session, settings)
        async with database.session() as session:
            assert (await client_count_users(session)) == 0
    finally:
        await database.dispose()


async def client_count_users(session: object) -> int:
    from sqlalchemy import func, select

    from backend.models import User

    return int(await session.scalar(select(func.count()).select_from(User)))  # type: ignore[attr-defined]


async def test_concurrent_starts_seed_one_admin_and_all_succeed(clean_db: str) -> None:
    """Workers and tasks that start together all seed the admin at once: exactly one
    creates it, the others find it, and none fails its start-up."""
    import asyncio

    from sqlalchemy import select

    from backend.database import Database
    from backend.models import Role, User
    from backend.tests.conftest import make_settings
    from backend.users.service import ensure_admin

    settings = make_settings(DATABASE_URL=clean_db)
    databases = [Database(settings) for _ in range(4)]

    async def start(database: Database) -> bool:
        async with database.session() as session:
            return await ensure_admin(session, settings) is not None

    try:
        for database in databases:  # connected beforehand, so the starts overlap
            async with database.session() as session:
                await session.scalar(select(User.id).limit(1))
        created = await asyncio.gather(*(start(database) for database in databases))
        assert sorted(created) == [False, False, False, True]
        async with databases[0].session() as session:
            admins = (await session.scalars(select(User).where(User.role == Role.ADMIN))).all()
        assert [admin.username for admin in admins] == [settings.ADMIN_USERNAME]
    finally:
        for database in databases:
            await database.dispose()
