"""What the phases share: the batch they pass along, the run context, and the protocol.

The engine drives every phase through the same steps: `start` once; per batch,
`transform` then `process` (in phase order, so a batch flows ingest -> ... ->
report before the next one is read); and `finish` once; `abort` replaces
`finish` when the run fails or is cancelled. Memory therefore stays bounded
by the batch size, not the tape size.

Runs execute in the API's event loop, so a phase splits its batch work in two:
`transform` is the CPU work and runs in a worker thread, `process` is the I/O
and runs on the loop. The transforms of consecutive phases with no `process`
between them run in one worker-thread hop per batch. A phase that keeps
BasePhase's no-op for a step does nothing there, and the engine skips it.

The worker thread still takes the GIL from the loop: a transform gives it back
only between Python bytecodes, so it must not make single C calls that run for
long (csv.reader drained by list(), writerows over a whole batch, map() over
thousands of rows): iterate in Python, or in slices of about a thousand rows.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from backend.models import Severity

if TYPE_CHECKING:
    from backend.config import Settings
    from backend.database import Database
    from backend.storage import Storage

T = TypeVar("T")


class PipelineFailure(Exception):
    """The run cannot go on. `message` is shown to users as is: keep it safe and clear."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class LeaseLost(Exception):
    """This process no longer owns the run (another one took it over): stop, write nothing."""


@dataclass(slots=True)
class LoanRow:
    """One tape row that passed validation; later phases fill in the derived fields.

    One field per column of `backend.pipeline.columns.LOAN_COLUMNS`, same names,
    same order (written out for the type checker; test_columns checks the match).
    Phases read and set the fields by name.
    """

    row_number: int
    loan_id: str
    borrower_id: str
    amount: float
    rate: float  # annual percent until normalize, then a fraction (6.5 -> 0.065)
    term_months: int
    credit_score: int
    annual_income: float
    monthly_debt: float
    property_value: float
    state: str
    property_type: str
    occupancy: str
    origination_date: date | str  # the raw text until normalize parses it
    sales_team: str | None
    monthly_payment: float = 0.0
    ltv: float = 0.0
    dti: float = 0.0
    grade: str = ""
    eligible: bool = True


@dataclass(frozen=True, slots=True)
class ExceptionRecord:
    """A LoanException before it has a sequence number."""

    row_number: int
    loan_id: str | None
    severity: Severity
    rule_id: str
    field: str | None
    message: str


@dataclass(slots=True)
class Batch:
    """Up to PIPELINE_BATCH_SIZE tape rows on their way through the phases."""

    index: int
    # (row number, fields): tuples of strings, which the garbage collector stops
    # tracking, so a batch waiting in memory does not lengthen its collections.
    raw: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    rows: list[LoanRow] = field(default_factory=list)
    exceptions: list[ExceptionRecord] = field(default_factory=list)

    def clear(self) -> None:
        """Drop what the batch carries (thousands of objects to free: not on the loop)."""
        self.raw.clear()
        self.rows.clear()
        self.exceptions.clear()


@dataclass
class RunCounts:
    total: int = 0
    eligible: int = 0
    ineligible: int = 0
    rejected: int = 0
    exceptions: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "total": self.total,
            "eligible": self.eligible,
            "ineligible": self.ineligible,
            "rejected": self.rejected,
            "exceptions": self.exceptions,
        }


@dataclass
class RunContext:
    """Everything one run's phases read and share."""

    run_id: uuid.UUID
    input_path: str
    output_prefix: str
    settings: Settings
    storage: Storage
    database: Database
    # The executor that owns the run (backend/pipeline/leases.py); None when the run
    # is executed outside the lease protocol (benchmarks, phase tests).
    owner: str | None = None
    attempt: int = 1
    header: list[str] = field(default_factory=list)
    exhausted: bool = False
    counts: RunCounts = field(default_factory=RunCounts)
    rule_failures: Counter[str] = field(default_factory=Counter)
    durations: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Phase(Protocol):
    """One step of the pipeline."""

    name: str

    async def start(self, ctx: RunContext) -> None:
        """Prepare for the run (open streams, connections); may raise PipelineFailure."""
        ...

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        """Do this phase's CPU work on `batch`, in place; may raise PipelineFailure.

        Runs in a worker thread, before this phase's `process` and after the
        previous phase's steps: it may read and change the batch, the context
        and the phase's own state, but must not await or touch anything bound to
        the event loop (connections, tasks, events).
        """
        ...

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        """Do this phase's I/O for `batch` (read, send, write), on the event loop.

        Anything CPU-heavy belongs in `transform`: here it stalls every other
        task of the process, requests included.
        """
        ...

    async def finish(self, ctx: RunContext) -> None:
        """Complete the run's work (flush, commit, upload) after the last batch."""
        ...

    async def abort(self, ctx: RunContext) -> None:
        """Release resources after a failure; must not raise."""
        ...


class BasePhase:
    """No-op defaults, so a phase only writes the steps it needs."""

    name = "phase"

    async def start(self, ctx: RunContext) -> None:
        return None

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        return None

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        return None

    async def finish(self, ctx: RunContext) -> None:
        return None

    async def abort(self, ctx: RunContext) -> None:
        return None


def does(phase: Phase, step: Literal["transform", "process"]) -> bool:
    """Whether `phase` has work in `step`: False when it keeps BasePhase's no-op."""
    return getattr(type(phase), step, None) is not getattr(BasePhase, step)


async def off_loop(work: Callable[[], T]) -> T:
    """Run `work` in a worker thread, in a copy of the current context (so the
    current span and the run's log fields go with it), and return its result.

    Cancelling the caller cannot stop the thread: the cancellation waits for
    `work` to end before it goes on, so nothing that runs next (an abort, a
    clean-up) races it over the same batch and phases.
    """
    loop = asyncio.get_running_loop()
    done = loop.run_in_executor(None, contextvars.copy_context().run, work)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.wait([done])
        raise
