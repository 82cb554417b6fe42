"""The engine: CPU work in a worker thread, I/O on the event loop, and what crosses between.

Runs are real (PostgreSQL, local storage, the hand-made tape); the phases are the
default ones, some of them recording which thread each step ran in.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backend.config import Settings
from backend.database import Database
from backend.models import PipelineRun, RunStatus
from backend.pipeline.engine import PipelineEngine, stretches
from backend.pipeline.phases import PHASE_NAMES, default_phases
from backend.pipeline.phases.base import Batch, Phase, RunContext, off_loop
from backend.pipeline.phases.ingest import IngestPhase
from backend.pipeline.phases.persist import PersistPhase
from backend.pipeline.phases.report import ReportPhase
from backend.pipeline.phases.validate import ValidatePhase
from backend.storage.local import LocalStorage
from backend.tests.pipeline_support import KNOWN_TAPE

# (phase, step, batch index, thread id) for every step a spy phase took.
Steps = list[tuple[str, str, int, int]]


def test_one_hop_per_stretch_of_phases_without_io() -> None:
    plan = stretches(default_phases())
    assert [[p.name for p in s.phases] for s in plan] == [
        ["ingest"],
        ["validate", "normalize", "enrich", "eligibility", "persist"],
        ["report"],
    ]
    assert [s.io.name if s.io else None for s in plan] == ["ingest", "persist", None]
    assert [sorted(s.transforming) for s in plan] == [
        [],
        ["eligibility", "enrich", "normalize", "persist", "validate"],
        ["report"],
    ]


def spy_phases(steps: Steps) -> list[Phase]:
    """The default phases; ingest, validate, persist and report note where each step ran."""

    def note(name: str, step: str, batch: Batch) -> None:
        steps.append((name, step, batch.index, threading.get_ident()))

    class SpyIngest(IngestPhase):
        async def process(self, batch: Batch, ctx: RunContext) -> None:
            note(self.name, "process", batch)
            await super().process(batch, ctx)

    class SpyValidate(ValidatePhase):
        def transform(self, batch: Batch, ctx: RunContext) -> None:
            note(self.name, "transform", batch)
            super().transform(batch, ctx)

    class SpyPersist(PersistPhase):
        def transform(self, batch: Batch, ctx: RunContext) -> None:
            note(self.name, "transform", batch)
            super().transform(batch, ctx)

        async def process(self, batch: Batch, ctx: RunContext) -> None:
            note(self.name, "process", batch)
            await super().process(batch, ctx)

    class SpyReport(ReportPhase):
        def transform(self, batch: Batch, ctx: RunContext) -> None:
            note(self.name, "transform", batch)
            super().transform(batch, ctx)

    _, _, normalize, enrich, eligibility, _, _ = default_phases()
    return [
        SpyIngest(),
        SpyValidate(),
        normalize,
        enrich,
        eligibility,
        SpyPersist(),
        SpyReport(),
    ]


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    db = Database(settings)
    yield db
    await db.dispose()


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def new_run(database: Database) -> uuid.UUID:
    run_id = uuid.uuid4()
    async with database.session() as session:
        session.add(PipelineRun(id=run_id, status=RunStatus.RUNNING, input_path="inputs/t.csv"))
    return run_id


async def test_transforms_run_in_a_worker_thread_and_io_on_the_loop(
    settings: Settings, database: Database, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "root")
    await storage.save("inputs/t.csv", body(KNOWN_TAPE))
    steps: Steps = []
    engine = PipelineEngine(
        database,
        storage,
        settings.model_copy(update={"PIPELINE_BATCH_SIZE": 4}),
        phases=lambda: spy_phases(steps),
    )
    result = await engine.execute(await new_run(database), "inputs/t.csv")

    assert result.counts.as_dict() == {
        "total": 14,
        "eligible": 4,
        "ineligible": 6,
        "rejected": 4,
        "exceptions": 12,
    }
    assert set(result.durations) == set(PHASE_NAMES)
    loop_thread = threading.get_ident()
    for name, step, batch, thread in steps:
        assert (thread == loop_thread) == (step == "process"), (name, step, batch)
    batches = sorted({batch for _, _, batch, _ in steps})
    assert batches == [0, 1, 2, 3]  # 14 rows by 4, then the empty batch that ends the tape
    for batch in batches:
        taken = [(name, step) for name, step, b, _ in steps if b == batch]
        assert taken == [
            ("ingest", "process"),
            ("validate", "transform"),
            ("persist", "transform"),
            ("persist", "process"),
            ("report", "transform"),
        ]
        # Validate through persist: one hop, so one thread.
        threads = {name: t for name, step, b, t in steps if b == batch and step == "transform"}
        assert threads["validate"] == threads["persist"]


LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("label", default="none")


async def test_off_loop_runs_in_a_copy_of_the_context() -> None:
    LABEL.set("caller")

    def work() -> tuple[str, int]:
        seen = LABEL.get()
        LABEL.set("worker")
        return seen, threading.get_ident()

    seen, thread = await off_loop(work)
    assert (seen, LABEL.get()) == ("caller", "caller")
    assert thread != threading.get_ident()


async def test_a_cancelled_hop_waits_for_its_thread() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []

    def work() -> None:
        started.set()
        release.wait(30)
        finished.append("done")

    hop = asyncio.create_task(off_loop(work))
    await asyncio.to_thread(started.wait, 30)
    hop.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    # The thread cannot be stopped: the cancelled hop is still waiting for it.
    assert not hop.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await hop
    assert finished == ["done"]
