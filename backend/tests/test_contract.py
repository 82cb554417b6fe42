"""The API contract: /openapi.json documents every error in the envelope, inputs that
cannot fit a column are a 422, HEAD on the health probes, and gzip on the wire."""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt

from backend.tests.conftest import ADMIN_PASSWORD, TEST_SECRET
from backend.tests.hardening_support import ROOT, VENV_BIN
from backend.tests.pipeline_support import KNOWN_TAPE, upload_tape
from backend.tests.test_auth import assert_envelope
from backend.tests.worker_support import api_server, wait_ready

ERROR_REF = "#/components/schemas/ErrorResponse"


async def _operations(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    operations = {
        f"{method.upper()} {path}": operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    return document, operations


async def test_every_error_response_is_documented_as_the_envelope(
    client: httpx.AsyncClient,
) -> None:
    document, operations = await _operations(client)
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    assert schemas["ErrorResponse"]["required"] == ["error"]
    body = schemas["ErrorBody"]
    assert set(body["properties"]) == {"code", "message", "request_id", "trace_id", "details"}
    assert set(body["required"]) == set(body["properties"])
    for name, operation in operations.items():
        errors = {s: r for s, r in operation["responses"].items() if int(s) >= 400}
        assert {"400", "500", "504"} <= set(errors), name
        for status, response in errors.items():
            if name.startswith("HEAD "):
                assert "content" not in response, name  # a HEAD answer has no body
            elif (name, status) != ("GET /health/ready", "503"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (name, status)


async def test_each_route_documents_the_statuses_it_can_answer(
    client: httpx.AsyncClient,
) -> None:
    _, operations = await _operations(client)

    def statuses(name: str) -> set[int]:
        return {int(s) for s in operations[name]["responses"]}

    for name, operation in operations.items():
        path = name.split(" ", 1)[1]
        if path.startswith("/api/"):
            assert {429, 503} <= statuses(name), name
        if operation.get("security"):
            assert {401, 503} <= statuses(name), name
        if operation.get("parameters") or "requestBody" in operation:
            assert 422 in statuses(name), name
    assert {403, 404, 409, 415, 422} <= statuses("PATCH /api/users/{user_id}")
    assert 415 in statuses("POST /api/pipeline/run")
    assert 415 in statuses("POST /api/auth/register")
    assert 415 not in statuses("POST /api/auth/login")  # a form, not JSON
    assert 415 not in statuses("GET /api/users")
    assert {403, 409, 413, 415} <= statuses("POST /api/files/upload")
    assert 403 not in statuses("GET /api/files")
    assert 403 in statuses("POST /api/auth/register")  # ALLOW_REGISTRATION off
    assert 409 not in statuses("POST /api/auth/register")  # taken names are not revealed
    assert {403, 409} <= statuses("POST /api/teams")
    assert {403, 404, 409} <= statuses("PATCH /api/teams/{team_id}")
    assert 401 not in statuses("POST /api/auth/register")
    assert 404 in statuses("GET /api/pipeline/runs/{run_id}/facts")
    assert statuses("GET /health") == {200, 400, 500, 504}
    ready_503 = operations["GET /health/ready"]["responses"]["503"]
    assert ready_503["content"]["application/json"]["schema"]["$ref"].endswith("/Readiness")


async def test_sales_team_id_beyond_integer_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for value in (99_999_999_999, 2**31, 0, -1):
        response = await client.patch(
            "/api/users/1", json={"sales_team_id": value}, headers=admin_headers
        )
        error = assert_envelope(response, 422, "validation_error")
        assert error["details"][0]["location"] == "body.sales_team_id"  # type: ignore[index]
    for user_id in (2**31, 99_999_999_999, 0):
        response = await client.patch(f"/api/users/{user_id}", json={}, headers=admin_headers)
        assert_envelope(response, 422, "validation_error")


async def test_a_body_that_is_not_json_is_415_on_every_json_route(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    sends = [
        ("POST", "/api/pipeline/run", b"<run><input_path>x.csv</input_path></run>"),
        ("PATCH", "/api/users/1", b"<user><is_active>true</is_active></user>"),
        ("POST", "/api/auth/register", b"<user><username>mallory</username></user>"),
    ]
    for method, path, body in sends:
        for content_type in (
            "application/xml",
            "text/plain; charset=utf-8",
            "application/x-www-form-urlencoded",
        ):
            response = await client.request(
                method, path, content=body, headers={**admin_headers, "Content-Type": content_type}
            )
            error = assert_envelope(response, 415, "unsupported_media_type")
            assert "application/json" in str(error["message"]), (method, path, content_type)
    # JSON under any JSON media type still reaches the route.
    for content_type in (
        "application/json",
        "application/json; charset=utf-8",
        "application/merge-patch+json",
    ):
        response = await client.request(
            "PATCH",
            "/api/users/1",
            content=b'{"is_active": true}',
            headers={**admin_headers, "Content-Type": content_type},
        )
        assert response.status_code == 200, (content_type, response.text)
    # Forms and uploads are not JSON routes: login still takes its form.
    login = await client.post(
        "/api/auth/login", data={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert login.status_code == 200


async def test_a_signed_token_whose_subject_cannot_be_a_user_id_is_401(
    client: httpx.AsyncClient,
) -> None:
    now = int(time.time())
    for subject in (str(2**70), str(2**31), "0", "-1", "1_0", " 1", "\uff11"):
        claims = {"sub": subject, "role": "admin", "iat": now, "exp": now + 60}
        token = jwt.encode(claims, TEST_SECRET, algorithm="HS256")
        response = await client.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert_envelope(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


async def test_login_with_a_name_no_column_can_hold_is_401(client: httpx.AsyncClient) -> None:
    for username in ("a" * 51, "adm\x00in", "x" * 5000):
        response = await client.post(
            "/api/auth/login", data={"username": username, "password": "whatever-it-is"}
        )
        assert_envelope(response, 401, "unauthorized")


async def test_a_large_json_page_is_gzipped_and_decodes_to_the_same_json(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for n in range(12):
        registered = await client.post(
            "/api/auth/register",
            json={"username": f"user{n}", "email": f"user{n}@example.com", "password": "p" * 12},
        )
        assert registered.status_code == 202
    plain = await client.get("/api/users", headers={**admin_headers, "Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert len(plain.content) > 1000
    async with client.stream(
        "GET", "/api/users", headers={**admin_headers, "Accept-Encoding": "gzip"}
    ) as zipped:
        raw = b"".join([chunk async for chunk in zipped.aiter_raw()])
    assert zipped.status_code == 200
    assert zipped.headers["content-encoding"] == "gzip"
    assert "accept-encoding" in zipped.headers["vary"].lower()
    assert int(zipped.headers["content-length"]) == len(raw) < len(plain.content)
    assert gzip.decompress(raw) == plain.content
    # The headers the outer layers add are still there.
    assert zipped.headers["x-request-id"] and zipped.headers["server-timing"]


async def test_a_small_response_is_not_gzipped(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"Accept-Encoding": "gzip"})
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert response.json() == {"status": "ok"}


async def test_a_file_download_is_never_gzipped(
    client: httpx.AsyncClient, analyst: dict[str, str]
) -> None:
    content = KNOWN_TAPE * 4
    assert len(content) > 1000
    path = await upload_tape(client, analyst, "big.csv", content)
    async with client.stream(
        "GET",
        "/api/files/download",
        params={"path": path},
        headers={**analyst, "Accept-Encoding": "gzip"},
    ) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert response.headers["content-type"].startswith("text/csv")
    assert int(response.headers["content-length"]) == len(content)
    assert raw == content


async def test_null_role_or_is_active_is_422(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for body in ({"role": None}, {"is_active": None}):
        response = await client.patch("/api/users/1", json=body, headers=admin_headers)
        assert_envelope(response, 422, "validation_error")


async def test_a_405_allows_every_method_the_path_serves(
    client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await client.put("/api/files", headers=admin_headers)
    assert_envelope(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE, GET"


# ---------------------------------------------------------------- a real server


@pytest.fixture
def live_api(clean_db: str, tmp_path: Path) -> Iterator[str]:
    """A uvicorn process on the emptied test database, its admin seeded at start-up."""
    with api_server(tmp_path, "contract") as server:
        yield wait_ready(server)


def test_head_on_the_health_probes_answers_like_get(live_api: str) -> None:
    # Per-request headers (request id, timing, date) differ between any two requests.
    varying = {"x-request-id", "server-timing", "date"}
    for path in ("/health", "/health/live", "/health/ready"):
        get = httpx.get(f"{live_api}{path}")
        head = httpx.head(f"{live_api}{path}")
        assert head.status_code == get.status_code == 200, path
        assert head.content == b""
        if path != "/health/ready":  # readiness figures (time, memory) change the length
            assert int(head.headers["content-length"]) == len(get.content) > 0
            varying.discard("content-length")
        else:
            varying.add("content-length")
        same = {k: v for k, v in get.headers.items() if k not in varying}
        assert {k: v for k, v in head.headers.items() if k not in varying} == same, path


def admin_token(base_url: str) -> str:
    response = httpx.post(
        f"{base_url}/api/auth/login", data={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def test_the_live_api_conforms_to_its_openapi(live_api: str, tmp_path: Path) -> None:
    """Schemathesis against a real server: every check, ours included, on every operation.

    Built-in checks (no 5xx, documented statuses, content types and bodies, ...) plus
    `error_envelope` (contract_checks.py). Phases examples, coverage (boundary and
    negative values) and fuzzing, bounded by `--max-examples`; stateful is left out
    to keep the run near 30 s. Nothing is excluded: the service itself refuses the
    destructive calls that could end the run (an admin demoting or deactivating
    themselves is a 409), and server_env turns the rate limiter off.

    The CLI rather than the pytest plugin: schemathesis's lazy-fixture plugin reads
    `request.node._nodeid`, which pytest 9 no longer has.
    """
    command = [
        str(VENV_BIN / "schemathesis"),
        "--config-file",
        str(Path(__file__).with_name("contract.schemathesis.toml")),
        "run",
        f"{live_api}/openapi.json",
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {admin_token(live_api)}",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "15",
        "--generation-deterministic",
        "--request-timeout",
        "10",
        "--report-dir",
        str(tmp_path / "report"),
        "--no-color",
    ]
    # Run from tmp_path: schemathesis keeps a .schemathesis/ cache in its working directory.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SCHEMATHESIS_HOOKS": "backend.tests.contract_checks",
    }
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-3000:]
