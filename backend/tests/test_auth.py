"""Register, login and /me over HTTP, with every error status the API promises."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from jose import jwt

from backend.api.main import create_app
from backend.auth.security import create_access_token
from backend.config import Settings
from backend.tests.conftest import (
    ADMIN_PASSWORD,
    TEST_SECRET,
    UserFactory,
    bearer,
    login,
    make_settings,
)


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"code", "message", "request_id", "trace_id", "details"}
    return error  # type: ignore[no-any-return]


async def test_register_login_me(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/auth/register",
        json={"username": "jane.doe", "email": "Jane@Example.com", "password": "correct horse 42"},
    )
    assert response.status_code == 202
    assert response.json()["status"] == "accepted"
    assert "password" not in response.text

    login_response = await client.post(
        "/api/auth/login", data={"username": "jane.doe", "password": "correct horse 42"}
    )
    assert login_response.status_code == 200
    token_body = login_response.json()
    assert token_body["token_type"] == "bearer"
    assert token_body["expires_in"] == 30 * 60
    claims = jwt.get_unverified_claims(token_body["access_token"])
    assert claims["role"] == "viewer"
    assert claims["exp"] - claims["iat"] == 30 * 60

    me = await client.get("/api/auth/me", headers=bearer(token_body["access_token"]))
    assert me.status_code == 200
    body = me.json()
    assert claims["sub"] == str(body["id"])
    assert body["username"] == "jane.doe"
    assert body["email"] == "jane@example.com"
    assert body["role"] == "viewer"
    assert body["is_active"] is True
    assert body["sales_team_id"] is None
    assert "hashed_password" not in body and "password" not in body


@pytest.mark.parametrize(
    ("payload", "location"),
    [
        ({"username": "ab", "email": "a@example.com", "password": "x" * 12}, "body.username"),
        ({"username": "a" * 51, "email": "a@example.com", "password": "x" * 12}, "body.username"),
        ({"username": "bad name", "email": "a@example.com", "password": "x" * 12}, "body.username"),
        ({"username": "abc", "email": "not-an-email", "password": "x" * 12}, "body.email"),
        ({"username": "abc", "email": "a@example.com", "password": "tiny-pw"}, "body.password"),
        ({"username": "abc", "email": "a@example.com"}, "body.password"),
        ({"username": 12345, "email": "a@example.com", "password": "x" * 12}, "body.username"),
    ],
)
async def test_register_rejects_bad_input(
    client: httpx.AsyncClient, payload: dict[str, object], location: str
) -> None:
    response = await client.post("/api/auth/register", json=payload)
    error = assert_envelope(response, 422, "validation_error")
    details = error["details"]
    assert isinstance(details, list)
    assert location in [d["location"] for d in details]
    # The rejected value is never echoed back.
    assert "tiny-pw" not in response.text and "not-an-email" not in response.text


async def test_register_malformed_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/auth/register", content=b'{"username": ', headers={"Content-Type": "application/json"}
    )
    assert_envelope(response, 422, "validation_error")


async def test_register_taken_name_or_email_looks_like_a_new_account(
    client: httpx.AsyncClient,
) -> None:
    first = {"username": "dup", "email": "dup@example.com", "password": "password-long-1"}
    created = await client.post("/api/auth/register", json=first)
    same_name = {**first, "email": "other@example.com", "password": "password-long-2"}
    same_email = {**first, "username": "other", "email": "DUP@example.com"}
    taken = [await client.post("/api/auth/register", json=b) for b in (same_name, same_email)]
    # Same status and body, new or taken: registration never says which names exist.
    for response in (created, *taken):
        assert response.status_code == 202
        assert response.json() == created.json()
    # Nothing changed for the first account, and no second one exists.
    ok = await client.post(
        "/api/auth/login", data={"username": "dup", "password": "password-long-1"}
    )
    assert ok.status_code == 200
    overwritten = await client.post(
        "/api/auth/login", data={"username": "dup", "password": "password-long-2"}
    )
    assert overwritten.status_code == 401
    other = await client.post(
        "/api/auth/login", data={"username": "other", "password": "password-long-1"}
    )
    assert other.status_code == 401


async def test_registration_closed_is_403(clean_db: str, tmp_path: Path) -> None:
    settings = make_settings(
        DATABASE_URL=clean_db, STORAGE_LOCAL_ROOT=str(tmp_path), ALLOW_REGISTRATION=False
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            body = {"username": "newbie", "email": "newbie@example.com", "password": "x" * 12}
            response = await c.post("/api/auth/register", json=body)
            assert_envelope(response, 403, "registration_closed")
            login = await c.post(
                "/api/auth/login", data={"username": "newbie", "password": "x" * 12}
            )
            assert login.status_code == 401


def test_registration_default_follows_the_environment() -> None:
    assert make_settings().ALLOW_REGISTRATION is True
    assert make_settings(ENVIRONMENT="development").ALLOW_REGISTRATION is True
    production = {
        "ENVIRONMENT": "production",
        "SECRET_KEY": "q9Lx2vT7bN4mR8cW1zK6pH3sD5fJ0gYa",
        "DATABASE_URL": "postgresql+asyncpg://app@db.internal/loans",
        "ADMIN_PASSWORD": "a-real-admin-password-0451",
        "TRUSTED_HOSTS": "api.example.com",
    }
    assert make_settings(**production).ALLOW_REGISTRATION is False
    assert make_settings(**production, ALLOW_REGISTRATION=True).ALLOW_REGISTRATION is True


async def test_login_failures_are_indistinguishable(
    client: httpx.AsyncClient, make_user: UserFactory, admin_headers: dict[str, str]
) -> None:
    user = await make_user()
    wrong_password = await client.post(
        "/api/auth/login", data={"username": user["username"], "password": "wrong-password!"}
    )
    unknown_user = await client.post(
        "/api/auth/login", data={"username": "nobody-here", "password": "wrong-password!"}
    )
    for response in (wrong_password, unknown_user):
        error = assert_envelope(response, 401, "unauthorized")
        assert error["message"] == "Incorrect username or password"
        assert response.headers["www-authenticate"] == "Bearer"

    deactivate = await client.patch(
        f"/api/users/{user['id']}", json={"is_active": False}, headers=admin_headers
    )
    assert deactivate.status_code == 200
    inactive = await client.post(
        "/api/auth/login", data={"username": user["username"], "password": user["password"]}
    )
    assert_envelope(inactive, 401, "unauthorized")


async def test_login_missing_form_fields_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/auth/login", data={"username": "admin"})
    assert_envelope(response, 422, "validation_error")


async def test_login_with_very_long_password_is_401_not_500(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/auth/login", data={"username": "admin", "password": "p" * 5000}
    )
    assert_envelope(response, 401, "unauthorized")


def _forge(claims: dict[str, object], key: str = TEST_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=alg)


def _unsigned(claims: dict[str, object]) -> str:
    import base64
    import json

    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_token_problems_are_401_with_www_authenticate(
    client: httpx.AsyncClient, make_user: UserFactory, admin_headers: dict[str, str]
) -> None:
    user = await make_user()
    now = datetime.now(UTC)
    iat = int(now.timestamp())
    good = {"sub": str(user["id"]), "role": "viewer", "iat": iat, "exp": iat + 600}
    tokens = {
        "bad signature": _forge(good, key="another-secret-key-of-sufficient-length-xx"),
        "alg none": _unsigned(good),
        "expired": _forge({**good, "iat": iat - 7200, "exp": iat - 3600}),
        "missing sub": _forge({k: v for k, v in good.items() if k != "sub"}),
        "non-numeric sub": _forge({**good, "sub": "abc"}),
        "user gone": _forge({**good, "sub": "999999"}),
        "garbage": "not.a.token",
    }
    for name, token in tokens.items():
        response = await client.get("/api/auth/me", headers=bearer(token))
        assert response.status_code == 401, name
        assert response.headers["www-authenticate"] == "Bearer", name
        assert response.json()["error"]["code"] == "unauthorized", name

    no_header = await client.get("/api/auth/me")
    assert_envelope(no_header, 401, "unauthorized")

    # A valid token stops working once its user is deactivated.
    valid = _forge(good)
    assert (await client.get("/api/auth/me", headers=bearer(valid))).status_code == 200
    await client.patch(f"/api/users/{user['id']}", json={"is_active": False}, headers=admin_headers)
    assert (await client.get("/api/auth/me", headers=bearer(valid))).status_code == 401


async def test_tokens_carry_configured_lifetime(settings: Settings) -> None:
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    token, expires_in = create_access_token(settings, "7", "analyst", now=issued)
    claims = jwt.get_unverified_claims(token)
    assert expires_in == settings.ACCESS_TOKEN_EXPIRE_MINUTES * 60
    assert claims["exp"] == int((issued + timedelta(seconds=expires_in)).timestamp())


async def test_admin_seeded_from_settings(client: httpx.AsyncClient) -> None:
    token = await login(client, "admin", ADMIN_PASSWORD)
    me = await client.get("/api/auth/me", headers=bearer(token))
    assert me.json()["role"] == "admin"
