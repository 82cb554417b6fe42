"""What the pipeline tests share: the hand-made tape, uploading a tape over HTTP, and
driving one phase over one batch."""

from __future__ import annotations

from pathlib import Path

import httpx

from backend.pipeline.phases.base import Batch, Phase, RunContext

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


async def through(phase: Phase, batch: Batch, ctx: RunContext) -> None:
    """`batch` through `phase` in the engine's order (transform, then process), both
    here in the test's thread."""
    phase.transform(batch, ctx)
    await phase.process(batch, ctx)
