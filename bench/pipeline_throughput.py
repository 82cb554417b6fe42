"""Pipeline throughput: 100,000 generated loans end to end on PostgreSQL.

    TEST_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test \
        .venv/bin/python bench/pipeline_throughput.py [--rows N]

Migrates TEST_DATABASE_URL to head, writes a tape to a temporary local
storage root, runs it through the real runner (status writes, seven phases,
COPY, report files), prints loans/s, seconds, per-phase seconds and peak RSS
with their ratios to the targets, then deletes the run and its rows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import delete  # noqa: E402

from backend.config import Settings  # noqa: E402
from backend.database import Database  # noqa: E402
from backend.migrations.runner import upgrade  # noqa: E402
from backend.models import PipelineRun, RunStatus  # noqa: E402
from backend.pipeline.runner import PipelineRunner  # noqa: E402
from backend.pipeline.tape import write_tape  # noqa: E402
from backend.storage.local import LocalStorage  # noqa: E402

TARGET_SECONDS = 10.0
TARGET_RSS_MB = 300.0


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def bench(url: str, rows: int, root: Path) -> int:
    settings = Settings(
        _env_file=None,
        ENVIRONMENT="test",
        SECRET_KEY=uuid.uuid4().hex * 2,
        DATABASE_URL=url,
        STORAGE_LOCAL_ROOT=str(root),
    )
    database = Database(settings)
    storage = LocalStorage(root)
    runner = PipelineRunner(database, storage, settings)
    run_id = uuid.uuid4()
    async with database.session() as session:
        session.add(PipelineRun(id=run_id, status=RunStatus.QUEUED, input_path="inputs/bench.csv"))
    try:
        began = time.perf_counter()
        runner.submit(run_id)
        await runner.join()
        seconds = time.perf_counter() - began
        async with database.session() as session:
            run = await session.get(PipelineRun, run_id)
        assert run is not None
        if run.status != RunStatus.COMPLETED:
            print(f"run ended {run.status}: {run.error_message}")
            return 1
        rss = peak_rss_mb()
        print(f"loans:            {run.total_loans:,}")
        print(f"  eligible:       {run.eligible_loans:,}")
        print(f"  ineligible:     {run.ineligible_loans:,}")
        print(f"  rejected:       {run.rejected_loans:,}")
        print(f"  exceptions:     {run.exception_count:,}")
        ratio = seconds / TARGET_SECONDS
        print(f"seconds:          {seconds:.2f}  (target <= {TARGET_SECONDS:g}; ratio {ratio:.2f})")
        print(f"loans/s:          {run.total_loans / seconds:,.0f}")
        ratio = rss / TARGET_RSS_MB
        print(f"peak RSS:         {rss:.1f} MB  (target <= {TARGET_RSS_MB:g}; ratio {ratio:.2f})")
        print(
            "phase seconds:    " + ", ".join(f"{k} {v:.2f}" for k, v in run.phase_durations.items())
        )
        ok = seconds <= TARGET_SECONDS and rss <= TARGET_RSS_MB
        print("result:           " + ("within targets" if ok else "OUTSIDE targets"))
        return 0
    finally:
        async with database.session() as session:
            await session.execute(delete(PipelineRun).where(PipelineRun.id == run_id))
        await database.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    url = os.environ.get("TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    upgrade(url)
    with tempfile.TemporaryDirectory(prefix="loan-bench-") as tmp:
        root = Path(tmp)
        (root / "inputs").mkdir()
        began = time.perf_counter()
        write_tape(root / "inputs" / "bench.csv", args.rows, seed=args.seed)
        size_mb = (root / "inputs" / "bench.csv").stat().st_size / 1e6
        took = time.perf_counter() - began
        print(f"tape:             {args.rows:,} rows, {size_mb:.1f} MB, generated in {took:.2f} s")
        return asyncio.run(bench(url, args.rows, root))


if __name__ == "__main__":
    raise SystemExit(main())
