"""/api/files over HTTP: upload checks, listing, streamed download, delete, on local and S3."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.api.main import create_app
from backend.config import Settings
from backend.storage.local import PARTIAL_DIR
from backend.tests.conftest import (
    ADMIN_PASSWORD,
    UserFactory,
    bearer,
    login,
    make_settings,
    make_team,
)

CSV = b"loan_id,amount\nL1,100\nL2,200\n"


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c


def upload(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    name: str,
    content: bytes,
    **params: Any,
) -> Any:
    return client.post(
        "/api/files/upload",
        files={"file": (name, content, "text/csv")},
        headers=headers,
        params=params,
    )


async def test_upload_returns_path_size_and_sha256(
    client: httpx.AsyncClient, analyst: dict[str, str], settings: Settings
) -> None:
    response = await upload(client, analyst, "tape 2026.csv", CSV)
    assert response.status_code == 201, response.text
    me = (await client.get("/api/auth/me", headers=analyst)).json()
    # An analyst without a team uploads into their own scope (backend/scoping.py).
    assert response.json() == {
        "path": f"inputs/user-{me['id']}/tape_2026.csv",
        "name": "tape_2026.csv",
        "size": len(CSV),
        "sha256": hashlib.sha256(CSV).hexdigest(),
    }
    stored = Path(settings.STORAGE_LOCAL_ROOT) / "inputs" / f"user-{me['id']}" / "tape_2026.csv"
    assert stored.read_bytes() == CSV


async def test_upload_roles(client: httpx.AsyncClient, make_user: UserFactory) -> None:
    viewer = await make_user("viewer")
    assert (await upload(client, viewer["headers"], "a.csv", CSV)).status_code == 403
    assert (await upload(client, {}, "a.csv", CSV)).status_code == 401


async def test_existing_name_conflicts_unless_overwrite(
    client: httpx.AsyncClient, analyst: dict[str, str]
) -> None:
    assert (await upload(client, analyst, "a.csv", CSV)).status_code == 201
    again = await upload(client, analyst, "a.csv", b"x,y\n1,2\n")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "file_exists"
    replaced = await upload(client, analyst, "a.csv", b"x,y\n1,2\n", overwrite="true")
    assert replaced.status_code == 201
    assert replaced.json()["size"] == 8


@pytest.mark.parametrize(
    ("name", "content", "status"),
    [
        ("../escape.csv", CSV, 400),
        ("..%2fescape.csv", CSV, 400),
        ("notes.txt", CSV, 415),
        ("tape.xlsx", CSV, 415),
        ("image.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 415),
        ("nul.csv", b"a,b\n1,\x00\n", 415),
        ("latin1.csv", "name,city\nJos\u00e9,M\u00e1laga\n".encode("latin-1"), 415),
        ("no-header.csv", b"just one column\nno commas\n", 415),
        ("zipped.csv", gzip.compress(CSV), 415),
        ("plain.csv.gz", CSV, 415),
        ("empty.csv", b"", 400),
    ],
)
async def test_upload_rejections(
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    settings: Settings,
    name: str,
    content: bytes,
    status: int,
) -> None:
    response = await upload(client, analyst, name, content)
    assert response.status_code == status, response.text
    root = Path(settings.STORAGE_LOCAL_ROOT)
    assert list((root / "inputs").iterdir()) == []
    assert list((root / PARTIAL_DIR).iterdir()) == []


async def test_gzipped_csv_is_accepted(client: httpx.AsyncClient, analyst: dict[str, str]) -> None:
    body = gzip.compress(CSV)
    response = await upload(client, analyst, "tape.csv.gz", body)
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()


async def test_oversized_upload_leaves_nothing(tmp_path: Path, clean_db: str) -> None:
    settings = make_settings(
        DATABASE_URL=clean_db, STORAGE_LOCAL_ROOT=str(tmp_path / "s"), MAX_UPLOAD_SIZE_MB=1
    )
    big = b"loan_id,amount\n" + b"L0000001,123456.78\n" * 60_000  # ~1.1 MB
    async with serve(settings) as client:
        headers = bearer(await login(client, "admin", ADMIN_PASSWORD))
        response = await upload(client, headers, "big.csv", big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        listing = await client.get("/api/files", headers=headers)
        assert listing.json()["total"] == 0
    assert list((tmp_path / "s" / PARTIAL_DIR).iterdir()) == []
    assert list((tmp_path / "s" / "inputs").iterdir()) == []


async def test_list_filter_and_paginate(
    client: httpx.AsyncClient, admin_headers: dict[str, str], make_user: UserFactory
) -> None:
    team = await make_team(client, admin_headers, "North")
    analyst = (await make_user("analyst", sales_team_id=team))["headers"]
    for name in ["jan.csv", "feb.csv", "mar.csv"]:
        assert (await upload(client, analyst, name, CSV)).status_code == 201
    viewer = (await make_user("viewer", sales_team_id=team))["headers"]
    listing = await client.get("/api/files", params={"limit": 2}, headers=viewer)
    assert listing.status_code == 200
    body = listing.json()
    assert (body["total"], body["limit"], body["offset"]) == (3, 2, 0)
    assert [item["name"] for item in body["items"]] == ["feb.csv", "jan.csv"]
    assert body["items"][0]["path"] == f"inputs/team-{team}/feb.csv"
    assert body["items"][0]["size"] == len(CSV)
    # The prefix applies to the key, scope segment included.
    only = await client.get("/api/files", params={"prefix": f"team-{team}/ma"}, headers=viewer)
    assert [i["name"] for i in only.json()["items"]] == ["mar.csv"]
    outputs = await client.get("/api/files", params={"area": "outputs"}, headers=viewer)
    assert outputs.json()["total"] == 0
    bad_area = await client.get("/api/files", params={"area": "etc"}, headers=viewer)
    assert bad_area.status_code == 422
    bad_prefix = await client.get("/api/files", params={"prefix": "../"}, headers=viewer)
    assert bad_prefix.status_code == 400


async def test_download_streams_the_file(
    client: httpx.AsyncClient, admin_headers: dict[str, str], make_user: UserFactory
) -> None:
    team = await make_team(client, admin_headers, "North")
    analyst = (await make_user("analyst", sales_team_id=team))["headers"]
    content = b"loan_id,amount\n" + b"".join(b"L%07d,1000\n" % i for i in range(200_000))
    uploaded = await upload(client, analyst, "large.csv", content)
    assert uploaded.status_code == 201
    viewer = (await make_user("viewer", sales_team_id=team))["headers"]
    async with client.stream(
        "GET", "/api/files/download", params={"path": uploaded.json()["path"]}, headers=viewer
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert response.headers["content-length"] == str(len(content))
        assert "large.csv" in response.headers["content-disposition"]
        received = b"".join([chunk async for chunk in response.aiter_raw()])
    assert received == content


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("inputs/missing.csv", 404),
        ("inputs/../inputs/a.csv", 400),
        ("inputs/%2e%2e/%2e%2e/etc/passwd", 400),
        ("/etc/passwd", 400),
        ("inputs/a\\..\\b.csv", 400),
        ("inputs/a%00.csv", 400),
    ],
)
async def test_download_and_delete_bad_paths(
    client: httpx.AsyncClient, admin_headers: dict[str, str], path: str, status: int
) -> None:
    download = await client.get("/api/files/download", params={"path": path}, headers=admin_headers)
    assert download.status_code == status
    delete = await client.delete("/api/files", params={"path": path}, headers=admin_headers)
    assert delete.status_code == status


async def test_delete_is_admin_only(
    client: httpx.AsyncClient, analyst: dict[str, str], admin_headers: dict[str, str]
) -> None:
    path = (await upload(client, analyst, "a.csv", CSV)).json()["path"]
    denied = await client.delete("/api/files", params={"path": path}, headers=analyst)
    assert denied.status_code == 403
    ok = await client.delete("/api/files", params={"path": path}, headers=admin_headers)
    assert ok.status_code == 204
    gone = await client.get("/api/files/download", params={"path": path}, headers=admin_headers)
    assert gone.status_code == 404


async def test_files_api_on_s3(clean_db: str, s3_bucket: str, moto_endpoint: str) -> None:
    settings = make_settings(
        DATABASE_URL=clean_db,
        STORAGE_TYPE="s3",
        S3_BUCKET=s3_bucket,
        S3_PREFIX="env/dev",
        S3_ENDPOINT_URL=moto_endpoint,
    )
    async with serve(settings) as client:
        headers = bearer(await login(client, "admin", ADMIN_PASSWORD))
        created = await upload(client, headers, "s3 tape.csv", CSV)
        assert created.status_code == 201, created.text
        # The seeded admin (id 1) has no team: their own scope.
        path = "inputs/user-1/s3_tape.csv"
        assert created.json()["path"] == path
        assert (await upload(client, headers, "s3 tape.csv", CSV)).status_code == 409
        listing = await client.get("/api/files", headers=headers)
        assert [i["path"] for i in listing.json()["items"]] == [path]
        download = await client.get("/api/files/download", params={"path": path}, headers=headers)
        assert download.content == CSV
        deleted = await client.delete("/api/files", params={"path": path}, headers=headers)
        assert deleted.status_code == 204
        assert (await client.get("/api/files", headers=headers)).json()["total"] == 0


BOUNDARY = "loan-engine-test-boundary"


def multipart_parts(name: str, content: bytes, piece: int = 64 * 1024) -> list[bytes]:
    """A multipart body (a text field, then the file) cut into network-sized pieces."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    body = head + content + f"\r\n--{BOUNDARY}--\r\n".encode()
    return [body[i : i + piece] for i in range(0, len(body), piece)]


class CountingBody:
    """An async request body that records how many pieces the server pulled."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            self.pulled += 1
            yield part


def raw_upload(client: httpx.AsyncClient, headers: dict[str, str], body: Any, **params: Any) -> Any:
    return client.post(
        "/api/files/upload",
        content=body,
        params=params,
        headers={**headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


async def test_streamed_upload_in_small_pieces(
    client: httpx.AsyncClient, analyst: dict[str, str], settings: Settings
) -> None:
    content = b"loan_id,amount\n" + b"".join(b"L%07d,1000\n" % i for i in range(300_000))
    body = CountingBody(multipart_parts("pieces.csv", content, piece=7_001))
    response = await raw_upload(client, analyst, body)
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == hashlib.sha256(content).hexdigest()
    stored = Path(settings.STORAGE_LOCAL_ROOT) / response.json()["path"]
    assert stored.read_bytes() == content


async def test_oversized_upload_stops_reading_the_body(tmp_path: Path, clean_db: str) -> None:
    settings = make_settings(
        DATABASE_URL=clean_db, STORAGE_LOCAL_ROOT=str(tmp_path / "s"), MAX_UPLOAD_SIZE_MB=1
    )
    content = b"loan_id,amount\n" + b"L0000001,123456.78\n" * 500_000  # ~9.5 MB
    body = CountingBody(multipart_parts("huge.csv", content))
    async with serve(settings) as client:
        headers = bearer(await login(client, "admin", ADMIN_PASSWORD))
        response = await raw_upload(client, headers, body)
    assert response.status_code == 413
    # Refused after about 1 MB (plus one chunk), not after the whole 9.5 MB.
    assert body.pulled * 64 * 1024 < 3 * 1024 * 1024 < len(content)
    assert list((tmp_path / "s" / "inputs").iterdir()) == []
    assert list((tmp_path / "s" / PARTIAL_DIR).iterdir()) == []


async def test_conflict_is_answered_before_the_body_is_read(
    client: httpx.AsyncClient, analyst: dict[str, str]
) -> None:
    assert (await upload(client, analyst, "taken.csv", CSV)).status_code == 201
    body = CountingBody(multipart_parts("taken.csv", CSV * 100_000))
    response = await raw_upload(client, analyst, body)
    assert response.status_code == 409
    assert body.pulled == 1


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/json", b'{"file": "x"}', 415),
        ("multipart/form-data", b"--x\r\n", 415),  # no boundary
        (
            f"multipart/form-data; boundary={BOUNDARY}",
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="other"\r\n\r\nv\r\n'
            f"--{BOUNDARY}--\r\n".encode(),
            400,
        ),
        (
            f"multipart/form-data; boundary={BOUNDARY}",
            b"".join(multipart_parts("cut.csv", CSV))[:-40],  # the body ends inside the file
            400,
        ),
    ],
)
async def test_malformed_upload_bodies(
    client: httpx.AsyncClient,
    analyst: dict[str, str],
    settings: Settings,
    content_type: str,
    body: bytes,
    status: int,
) -> None:
    response = await client.post(
        "/api/files/upload", content=body, headers={**analyst, "Content-Type": content_type}
    )
    assert response.status_code == status, response.text
    assert list((Path(settings.STORAGE_LOCAL_ROOT) / "inputs").iterdir()) == []


async def test_unauthenticated_upload_is_refused_unread(client: httpx.AsyncClient) -> None:
    body = CountingBody(multipart_parts("a.csv", CSV))
    response = await raw_upload(client, {}, body)
    assert response.status_code == 401
    assert body.pulled == 0
