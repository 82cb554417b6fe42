"""What the pipeline tests share: the hand-made tape and uploading a tape over HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx

FIXTURES = Path(__file__).parent / "fixtures"
KNOWN_TAPE = (FIXTURES / "known_tape.csv").read_bytes()
DEADLINE_SECONDS = 60


async def upload_tape(
    client: httpx.AsyncClient, headers: dict[str, str], name: str, content: bytes
) -> str:
    """Upload `content` as `name` and return its storage path (the upload must succeed)."""
    response = await client.post(
        "/api/files/upload", files={"file": (name, content, "text/csv")}, headers=headers
    )
    assert response.status_code == 201, response.text
    path: str = response.json()["path"]
    return path
