"""Bodies of the pipeline endpoints."""

from __future__ import annotations

import uuid
from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field

from backend.models import RunStatus, Severity


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_path: str = Field(min_length=1, max_length=1024, examples=["inputs/tape.csv"])


class RunAccepted(BaseModel):
    run_id: uuid.UUID
    status: RunStatus
    trace_id: str | None = None
    trace_url: str | None = None


class RunRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    status: RunStatus
    input_path: str
    output_prefix: str | None
    total_loans: int
    eligible_loans: int
    ineligible_loans: int
    rejected_loans: int
    exception_count: int
    phase_durations: dict[str, float]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error_message: str | None
    created_by: int | None
    trace_id: str | None
    # Not a column: where the trace opens (TRACE_UI), filled in by the route.
    trace_url: str | None = None


class ExceptionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int
    row_number: int
    loan_id: str | None
    severity: Severity
    rule_id: str
    field: str | None
    message: str


class FactRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    row_number: int
    loan_id: str
    borrower_id: str
    amount: float
    rate: float
    term_months: int
    credit_score: int
    annual_income: float
    monthly_debt: float
    property_value: float
    state: str
    property_type: str
    occupancy: str
    origination_date: date
    sales_team: str | None
    monthly_payment: float
    ltv: float
    dti: float
    grade: str
    eligible: bool
