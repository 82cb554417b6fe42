"""Event-loop stalls: how late a 5 ms timer fires while a 100,000-loan run shares the loop.

    TEST_DATABASE_URL=postgresql+asyncpg://postgres@127.0.0.1:5432/test \
        .venv/bin/python bench/loop_stall.py [--rows N] [--on-loop] [--untuned]

The API executes runs in its own event loop, so every millisecond a run holds
the loop is a millisecond added to each request that waits behind it. This
migrates TEST_DATABASE_URL to head, writes a tape to a temporary local storage
root, inserts a queued run and executes it through the in-process runner (the
executor an API process uses: claim, lease renewals, seven phases) in this
loop while a probe sleeps 5 ms over and over and records how late it wakes.
Prints rows, seconds, loans/s, the longest and the 99th-percentile
stall, and the longest stall's ratio to the 20 ms target; then deletes the run
and its rows.

--on-loop runs the phases' CPU steps on the loop, as the engine did before
they moved to a worker thread. The process is tuned as every API and worker
process is once started (backend/runtime.py: gc.freeze() and higher collection
thresholds, a 1 ms GIL switch interval); --untuned leaves the interpreter's
defaults, to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from _support import bench_settings, completed_run, migrated_database_url, queued_run, tape_root

from backend.database import Database
from backend.pipeline import engine as engine_module
from backend.pipeline.phases import ingest as ingest_module
from backend.pipeline.runner import PipelineRunner
from backend.runtime import tune_for_latency
from backend.storage.local import LocalStorage

TARGET_STALL_MS = 20.0
PROBE_SECONDS = 0.005
T = TypeVar("T")


async def probe(lateness: list[float], stop: asyncio.Event) -> None:
    """Sleep PROBE_SECONDS until `stop`; record how late (seconds) each wake-up came."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + PROBE_SECONDS
        await asyncio.sleep(PROBE_SECONDS)
        lateness.append(max(0.0, loop.time() - due))


async def on_the_loop(work: Callable[[], T]) -> T:
    """Stands in for `off_loop`: the work runs right here, on the loop."""
    return work()


def percentile(values: list[float], share: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, int(share * len(ranked)))]


async def bench(url: str, root: Path, *, tuned: bool) -> int:
    settings = bench_settings(url, root)
    database = Database(settings)
    runner = PipelineRunner(database, LocalStorage(root), settings)
    if tuned:
        tune_for_latency(settings)
    try:
        async with queued_run(database) as run_id:
            return await measure(database, runner, run_id)
    finally:
        await database.dispose()


async def measure(database: Database, runner: PipelineRunner, run_id: uuid.UUID) -> int:
    lateness: list[float] = []
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(lateness, stop))
    await asyncio.sleep(0.05)  # the probe is running before the run starts
    began = time.perf_counter()
    try:
        await runner.dispatch(run_id)
        await runner.join()
    finally:
        seconds = time.perf_counter() - began
        stop.set()
        await prober
    run = await completed_run(database, run_id)
    if run is None:
        return 1
    total = run.total_loans
    worst = max(lateness) * 1000
    p99 = percentile(lateness, 0.99) * 1000
    print(f"loans:            {total:,}")
    print(f"seconds:          {seconds:.2f}")
    print(f"loans/s:          {total / seconds:,.0f}")
    print(f"probes:           {len(lateness):,} (every {PROBE_SECONDS * 1000:g} ms)")
    print(f"max stall:        {worst:.1f} ms  (target <= {TARGET_STALL_MS:g} ms; ratio ", end="")
    print(f"{worst / TARGET_STALL_MS:.2f})")
    print(f"p99 stall:        {p99:.1f} ms")
    print(f"median stall:     {percentile(lateness, 0.5) * 1000:.1f} ms")
    print("phase seconds:    " + ", ".join(f"{k} {v:.2f}" for k, v in run.phase_durations.items()))
    ok = worst <= TARGET_STALL_MS
    print("result:           " + ("within target" if ok else "OUTSIDE target"))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--on-loop", action="store_true", help="CPU steps on the loop (before)")
    parser.add_argument("--untuned", action="store_true", help="the interpreter's defaults")
    args = parser.parse_args()
    if args.on_loop:
        for module in (engine_module, ingest_module):
            setattr(module, "off_loop", on_the_loop)  # noqa: B010 (patched for this process only)
    url = migrated_database_url()
    with tape_root(args.rows, args.seed) as root:
        where = "on the loop (as before)" if args.on_loop else "in a worker thread"
        print(f"CPU steps:        {where}")
        print(f"process:          {'untuned (defaults)' if args.untuned else 'tuned as a server'}")
        return asyncio.run(bench(url, root, tuned=not args.untuned))


if __name__ == "__main__":
    raise SystemExit(main())
