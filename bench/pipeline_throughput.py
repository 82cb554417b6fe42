"""Pipeline throughput: 100,000 generated loans end to end on PostgreSQL.

    TEST_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test \
        .venv/bin/python bench/pipeline_throughput.py [--rows N] [--executor celery]

`--executor celery` publishes the run to BENCH_BROKER_URL (default
redis://127.0.0.1:6379/14) and a `celery worker` subprocess executes it; the
time runs from the publish to the completed row, and the peak RSS is the
worker pool process's.

Migrates TEST_DATABASE_URL to head, writes a tape to a temporary local
storage root, runs it through the in-process runner (claim, lease, seven phases,
COPY, report files), prints loans/s, seconds, per-phase seconds and peak RSS
with their ratios to the targets, then deletes the run and its rows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
from _support import (
    ROOT,
    bench_settings,
    completed_run,
    migrated_database_url,
    queued_run,
    tape_root,
)
from sqlalchemy import select

from backend.config import Settings
from backend.database import Database
from backend.models import PipelineRun, RunStatus
from backend.pipeline.runner import PipelineRunner
from backend.storage.local import LocalStorage
from backend.worker.publisher import CeleryPublisher

TARGET_SECONDS = 10.0
TARGET_RSS_MB = 300.0


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def bench(url: str, root: Path, executor: str) -> int:
    settings = bench_settings(url, root)
    database = Database(settings)
    storage = LocalStorage(root)
    try:
        async with queued_run(database) as run_id:
            return await measure(settings, database, storage, run_id, root, executor)
    finally:
        await database.dispose()


async def measure(
    settings: Settings,
    database: Database,
    storage: LocalStorage,
    run_id: uuid.UUID,
    root: Path,
    executor: str,
) -> int:
    if executor == "celery":
        seconds, rss = await on_celery(settings, database, run_id, root)
    else:
        runner = PipelineRunner(database, storage, settings)
        began = time.perf_counter()
        await runner.dispatch(run_id)
        await runner.join()
        seconds = time.perf_counter() - began
        rss = peak_rss_mb()
    run = await completed_run(database, run_id)
    if run is None:
        return 1
    print(f"executor:         {executor}")
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
    print("phase seconds:    " + ", ".join(f"{k} {v:.2f}" for k, v in run.phase_durations.items()))
    ok = seconds <= TARGET_SECONDS and rss <= TARGET_RSS_MB
    print("result:           " + ("within targets" if ok else "OUTSIDE targets"))
    return 0


async def on_celery(
    settings: Settings, database: Database, run_id: uuid.UUID, root: Path
) -> tuple[float, float]:
    """Execute the run on a real worker; (seconds from publish to completed, peak RSS MB)."""
    broker = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14")
    env = {
        **os.environ,
        "ENVIRONMENT": "test",
        "SECRET_KEY": settings.secret_key,
        "DATABASE_URL": settings.DATABASE_URL,
        "STORAGE_LOCAL_ROOT": str(root),
        "CELERY_BROKER_URL": broker,
        "PIPELINE_EXECUTOR": "celery",
        "OTEL_TRACES_EXPORTER": "none",
        "C_FORCE_ROOT": "1",
    }
    argv = [sys.executable, "-m", "celery", "-A", "backend.worker", "--quiet", "worker",
            "--concurrency", "1", "--without-gossip", "--without-mingle"]  # fmt: skip
    log = root / "worker.log"
    with log.open("wb") as out:
        # The benchmark's own child; nothing else runs on this loop meanwhile.
        worker = subprocess.Popen(  # noqa: ASYNC220
            argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while b"worker.process.started" not in log.read_bytes():
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        publisher = CeleryPublisher(
            database, settings.model_copy(update={"CELERY_BROKER_URL": broker})
        )
        began = time.perf_counter()
        await publisher.dispatch(run_id)
        while True:
            async with database.session() as session:
                status = await session.scalar(
                    select(PipelineRun.status).where(PipelineRun.id == run_id)
                )
            if status not in (RunStatus.QUEUED, RunStatus.RUNNING):
                break
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - began
        pool = psutil.Process(worker.pid).children()
        peak_kb = max(_peak_kb(p.pid) for p in pool) if pool else 0
        await publisher.shutdown(0)
        return seconds, peak_kb / 1024
    finally:
        worker.terminate()
        worker.wait(60)


def _peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--executor", choices=("inprocess", "celery"), default="inprocess")
    args = parser.parse_args()
    url = migrated_database_url()
    with tape_root(args.rows, args.seed) as root:
        return asyncio.run(bench(url, root, args.executor))


if __name__ == "__main__":
    raise SystemExit(main())
