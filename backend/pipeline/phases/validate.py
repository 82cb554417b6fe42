"""Phase 2, validate: the tape has every required column; each row has readable values.

A missing column fails the run (nothing else can be trusted). A bad row (wrong
field count, a value of the wrong type, out of range, an impossible date, a
repeated loan_id) becomes one LoanException per problem, severity `error`,
and leaves the batch; the run goes on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import date, datetime

from backend.models import Severity
from backend.pipeline.columns import max_length
from backend.pipeline.phases.base import (
    BasePhase,
    Batch,
    ExceptionRecord,
    LoanRow,
    PipelineFailure,
    RunContext,
)
from backend.pipeline.tape import REQUIRED_COLUMNS

# Text may be as long as its column (and the loan_id of an exception) stores.
MAX_ID_LENGTH = max_length("loan_id")
MAX_AMOUNT = 100_000_000.0
MIN_DATE = date(1900, 1, 1)
DATE_FORMATS = ("%m/%d/%Y",)


class RowError(Exception):
    """One unreadable value: the exception's rule id, field and message."""

    def __init__(self, rule_id: str, column: str, message: str) -> None:
        self.rule_id = rule_id
        self.column = column
        self.message = message


def parse_date(text: str) -> date:
    """`YYYY-MM-DD` (or `MM/DD/YYYY`) to a date; ValueError if neither fits."""
    text = text.strip()
    try:
        return date.fromisoformat(text)
    except ValueError:
        pass
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    raise ValueError(text)


def _number(column: str, text: str, low: float, high: float, *, low_open: bool = False) -> float:
    value_text = text.strip()
    if not value_text:
        raise RowError("missing_value", column, f"{column} is empty")
    try:
        value = float(value_text.rstrip("%") if column == "rate" else value_text)
    except ValueError:
        raise RowError("invalid_number", column, f"{column} is not a number") from None
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise RowError("out_of_range", column, f"{column} {value_text} is outside {bound}")
    return value


def _integer(column: str, text: str, low: int, high: int) -> int:
    value_text = text.strip()
    if not value_text:
        raise RowError("missing_value", column, f"{column} is empty")
    try:
        value = int(value_text)
    except ValueError:
        raise RowError("invalid_number", column, f"{column} is not a whole number") from None
    if value < low or value > high:
        raise RowError("out_of_range", column, f"{column} {value} is outside [{low}, {high}]")
    return value


def _text(column: str, text: str, limit: int, *, required: bool = True) -> str:
    value = text.strip()
    if required and not value:
        raise RowError("missing_value", column, f"{column} is empty")
    if len(value) > limit:
        raise RowError("value_too_long", column, f"{column} is longer than {limit} characters")
    return text


def _text_check(column: str, *, required: bool = True) -> Callable[[str], str]:
    limit = max_length(column)
    return lambda v: _text(column, v, limit, required=required)


def _state(text: str) -> str:
    value = text.strip()
    if not value:
        raise RowError("missing_value", "state", "state is empty")
    if len(value) != 2 or not value.isascii() or not value.isalpha():
        raise RowError("invalid_value", "state", "state must be a two-letter code")
    return text


def _origination(text: str) -> str:
    if not text.strip():
        raise RowError("missing_value", "origination_date", "origination_date is empty")
    try:
        value = parse_date(text)
    except ValueError:
        raise RowError(
            "invalid_date", "origination_date", "origination_date is not a valid date"
        ) from None
    if value < MIN_DATE or value > date.today():
        raise RowError(
            "out_of_range", "origination_date", "origination_date is before 1900 or in the future"
        )
    return text


# Column -> check; each returns the value LoanRow stores (normalize finishes the job).
CHECKS: dict[str, Callable[[str], object]] = {
    "loan_id": _text_check("loan_id"),
    "borrower_id": _text_check("borrower_id"),
    "amount": lambda v: _number("amount", v, 0, MAX_AMOUNT, low_open=True),
    "rate": lambda v: _number("rate", v, 0, 25),
    "term_months": lambda v: _integer("term_months", v, 1, 480),
    "credit_score": lambda v: _integer("credit_score", v, 300, 850),
    "annual_income": lambda v: _number("annual_income", v, 0, MAX_AMOUNT, low_open=True),
    "monthly_debt": lambda v: _number("monthly_debt", v, 0, MAX_AMOUNT),
    "property_value": lambda v: _number("property_value", v, 0, MAX_AMOUNT, low_open=True),
    "state": _state,
    "property_type": _text_check("property_type"),
    "occupancy": _text_check("occupancy"),
    "origination_date": _origination,
    "sales_team": _text_check("sales_team", required=False),
}
assert set(CHECKS) == set(REQUIRED_COLUMNS)


class ValidatePhase(BasePhase):
    name = "validate"

    def __init__(self) -> None:
        # (column, its check, its position in the tape's rows), in REQUIRED_COLUMNS order.
        self._plan: tuple[tuple[str, Callable[[str], object], int], ...] = ()
        self._loan_id_at = 0
        self._width = 0
        self._seen_ids: set[str] = set()

    async def start(self, ctx: RunContext) -> None:
        names = [name.strip().lower() for name in ctx.header]
        duplicates = sorted({n for n in names if n and names.count(n) > 1})
        if duplicates:
            raise PipelineFailure(f"The tape repeats columns: {', '.join(duplicates)}")
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise PipelineFailure(f"The tape is missing required columns: {', '.join(missing)}")
        self._plan = tuple((c, CHECKS[c], names.index(c)) for c in REQUIRED_COLUMNS)
        self._loan_id_at = names.index("loan_id")
        self._width = len(names)

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        plan = self._plan
        loan_id_at = self._loan_id_at
        width = self._width
        seen = self._seen_ids
        rows = batch.rows
        problems = batch.exceptions
        for row_number, fields in batch.raw:
            loan_id = (
                fields[loan_id_at].strip()[:MAX_ID_LENGTH] if loan_id_at < len(fields) else None
            )
            if len(fields) != width:
                problems.append(
                    ExceptionRecord(
                        row_number,
                        loan_id or None,
                        Severity.ERROR,
                        "malformed_row",
                        None,
                        f"expected {width} fields, found {len(fields)}",
                    )
                )
                ctx.counts.rejected += 1
                continue
            values: dict[str, object] = {}
            errors: list[RowError] = []
            for column, check, position in plan:
                try:
                    values[column] = check(fields[position])
                except RowError as error:
                    errors.append(error)
            if not errors and loan_id in seen:
                errors.append(
                    RowError("duplicate_loan_id", "loan_id", "loan_id appears earlier in the tape")
                )
            if errors:
                problems.extend(
                    ExceptionRecord(
                        row_number, loan_id or None, Severity.ERROR, e.rule_id, e.column, e.message
                    )
                    for e in errors
                )
                ctx.counts.rejected += 1
                continue
            seen.add(loan_id)  # type: ignore[arg-type]
            rows.append(LoanRow(row_number=row_number, **values))  # type: ignore[arg-type]
        batch.raw = []  # the raw text is no longer needed; free it early
