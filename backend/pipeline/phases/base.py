"""What the phases share: the batch they pass along, the run context, and the protocol.

The engine drives every phase through the same three steps: `start` once,
`process` once per batch (in phase order, so a batch flows ingest -> ... ->
report before the next one is read), and `finish` once; `abort` replaces
`finish` when the run fails or is cancelled. Memory therefore stays bounded
by the batch size, not the tape size.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any, Protocol

from backend.models import Severity

if TYPE_CHECKING:
    from backend.config import Settings
    from backend.database import Database
    from backend.storage import Storage


class PipelineFailure(Exception):
    """The run cannot go on. `message` is shown to users as is: keep it safe and clear."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


@dataclass(slots=True)
class LoanRow:
    """One tape row that passed validation; later phases fill in the derived fields."""

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
    raw: list[tuple[int, list[str]]] = field(default_factory=list)
    rows: list[LoanRow] = field(default_factory=list)
    exceptions: list[ExceptionRecord] = field(default_factory=list)


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

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        """Do this phase's work on `batch`, in place."""
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

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        return None

    async def finish(self, ctx: RunContext) -> None:
        return None

    async def abort(self, ctx: RunContext) -> None:
        return None
