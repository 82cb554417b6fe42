"""Bodies of the pipeline endpoints."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, assert_never

from pydantic import BaseModel, ConfigDict, Field, create_model

from backend.models import RunStatus, Severity
from backend.pipeline.columns import LOAN_COLUMNS, Kind, LoanColumn
from backend.storage.base import MAX_PATH_LENGTH


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_path: str = Field(min_length=1, max_length=MAX_PATH_LENGTH, examples=["inputs/tape.csv"])


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


def _api_type(column: LoanColumn) -> Any:
    """How a loan column of this kind reads in JSON (money and rates as numbers)."""
    match column.kind:
        case Kind.TEXT | Kind.CODE:
            python: type = str
        case Kind.MONEY | Kind.RATE | Kind.RATIO:
            python = float
        case Kind.INT:
            python = int
        case Kind.DATE:
            python = date
        case Kind.FLAG:
            python = bool
        case _:
            assert_never(column.kind)
    return python | None if column.nullable else python


class _FactBase(BaseModel):
    model_config = ConfigDict(from_attributes=True)


if TYPE_CHECKING:
    # create_model is opaque to mypy: to it, a fact is a model whose fields it does not know.
    class FactRead(_FactBase):
        pass

else:
    # One loan fact as the API returns it: every column of LOAN_COLUMNS, in order, all required.
    FactRead = create_model(
        "FactRead",
        __base__=_FactBase,
        __module__=__name__,
        **{column.name: (_api_type(column), ...) for column in LOAN_COLUMNS},
    )
