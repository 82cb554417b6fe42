"""What the benchmarks share: the database to use, a generated tape, a queued run."""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import delete  # noqa: E402

from backend.config import Settings  # noqa: E402
from backend.database import Database  # noqa: E402
from backend.migrations.runner import upgrade  # noqa: E402
from backend.models import PipelineRun, RunStatus  # noqa: E402
from backend.pipeline.tape import write_tape  # noqa: E402

TAPE = "inputs/bench.csv"


def migrated_database_url() -> str:
    """TEST_DATABASE_URL (the test database by default), migrated to head."""
    url = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    upgrade(url)
    return url


def bench_settings(url: str, root: Path) -> Settings:
    return Settings(
        _env_file=None,
        ENVIRONMENT="test",
        SECRET_KEY=uuid.uuid4().hex * 2,
        DATABASE_URL=url,
        STORAGE_LOCAL_ROOT=str(root),
    )


@contextmanager
def tape_root(rows: int, seed: int) -> Iterator[Path]:
    """A temporary storage root holding TAPE with `rows` generated loans (printed)."""
    with tempfile.TemporaryDirectory(prefix="loan-bench-") as tmp:
        root = Path(tmp)
        (root / "inputs").mkdir()
        began = time.perf_counter()
        write_tape(root / TAPE, rows, seed=seed)
        size_mb = (root / TAPE).stat().st_size / 1e6
        took = time.perf_counter() - began
        print(f"tape:             {rows:,} rows, {size_mb:.1f} MB, generated in {took:.2f} s")
        yield root


@asynccontextmanager
async def queued_run(database: Database) -> AsyncIterator[uuid.UUID]:
    """A queued run of TAPE, deleted (with its rows) afterwards."""
    run_id = uuid.uuid4()
    async with database.session() as session:
        session.add(PipelineRun(id=run_id, status=RunStatus.QUEUED, input_path=TAPE))
    try:
        yield run_id
    finally:
        async with database.session() as session:
            await session.execute(delete(PipelineRun).where(PipelineRun.id == run_id))


async def completed_run(database: Database, run_id: uuid.UUID) -> PipelineRun | None:
    """The run's row if it completed; otherwise None, with how it ended printed."""
    async with database.session() as session:
        run = await session.get(PipelineRun, run_id)
    if run is None or run.status != RunStatus.COMPLETED:
        print(f"run ended {run.status if run else 'missing'}: {run.error_message if run else ''}")
        return None
    return run
