"""The loan columns, defined once.

A loan carries the same values from the tape to every output: `LoanRow` in the
phases, the `loan_facts` table (`LoanFact`) and the COPY that fills it, the
facts API (`FactRead`) and `eligible.csv`. Each of those takes its column
names, order and types from `LOAN_COLUMNS` and matches values by name, never
by position, so moving a column here moves it everywhere and no consumer can
shift another's data. A new or changed column is one edit here, a migration
when the table changes, and the code that fills it (validate and normalize for
a tape column, enrich for a derived one); `LoanRow` is written out by hand for
the type checker, and `backend/tests/test_columns.py` fails until it matches.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import assert_never


class Kind(enum.Enum):
    """What a column holds. The kind fixes the column's SQL type (models), its API
    type (schemas), the value COPY sends (persist) and its eligible.csv text (report)."""

    TEXT = "text"  # free text of up to `length` characters
    CODE = "code"  # a short canonical code (state, property type, grade), up to `length`
    MONEY = "money"  # dollars and cents: NUMERIC(14, 2), written 0.00
    RATE = "rate"  # the annual rate as a fraction: NUMERIC(8, 6), written 0.000000
    RATIO = "ratio"  # LTV, DTI rounded to 4 places: double precision, written 0.0000
    INT = "int"
    DATE = "date"  # written YYYY-MM-DD
    FLAG = "flag"  # true or false


class Origin(enum.Enum):
    """Where a column's value comes from."""

    ROW = "row"  # the record's number in the tape, from 1 after the header (ingest)
    TAPE = "tape"  # a required tape column: read by validate, cleaned by normalize
    DERIVED = "derived"  # computed by enrich
    VERDICT = "verdict"  # set by eligibility


@dataclass(frozen=True, slots=True)
class LoanColumn:
    """One loan column: its name everywhere (tape header, attribute, table column,
    JSON key, eligible.csv header), what it holds and where it comes from."""

    name: str
    kind: Kind
    origin: Origin
    length: int | None = None  # TEXT and CODE: the most characters stored (VARCHAR)
    nullable: bool = False  # may be empty in the tape, NULL in the table, null in JSON
    key: bool = False  # with run_id, the primary key of loan_facts
    in_report: bool = True  # a column of eligible.csv

    @property
    def report_format(self) -> str:
        """The format spec eligible.csv writes the value with (`format(value, spec)`;
        '' writes it as `str(value)`, and the CSV writer writes None as an empty field)."""
        match self.kind:
            case Kind.MONEY:
                return ".2f"
            case Kind.RATE:
                return ".6f"
            case Kind.RATIO:
                return ".4f"
            case Kind.TEXT | Kind.CODE | Kind.INT | Kind.DATE | Kind.FLAG:
                return ""
            case _:
                assert_never(self.kind)


def _text(name: str, length: int, *, nullable: bool = False) -> LoanColumn:
    return LoanColumn(name, Kind.TEXT, Origin.TAPE, length=length, nullable=nullable)


def _code(name: str, length: int, origin: Origin = Origin.TAPE) -> LoanColumn:
    return LoanColumn(name, Kind.CODE, origin, length=length)


def _money(name: str, origin: Origin = Origin.TAPE) -> LoanColumn:
    return LoanColumn(name, Kind.MONEY, origin)


# In the order of loan_facts, the facts API and eligible.csv; the tape's own order is free.
LOAN_COLUMNS: tuple[LoanColumn, ...] = (
    LoanColumn("row_number", Kind.INT, Origin.ROW, key=True),
    _text("loan_id", 64),
    _text("borrower_id", 64),
    _money("amount"),
    LoanColumn("rate", Kind.RATE, Origin.TAPE),
    LoanColumn("term_months", Kind.INT, Origin.TAPE),
    LoanColumn("credit_score", Kind.INT, Origin.TAPE),
    _money("annual_income"),
    _money("monthly_debt"),
    _money("property_value"),
    _code("state", 2),
    _code("property_type", 32),
    _code("occupancy", 32),
    LoanColumn("origination_date", Kind.DATE, Origin.TAPE),
    _text("sales_team", 100, nullable=True),
    _money("monthly_payment", Origin.DERIVED),
    LoanColumn("ltv", Kind.RATIO, Origin.DERIVED),
    LoanColumn("dti", Kind.RATIO, Origin.DERIVED),
    _code("grade", 2, Origin.DERIVED),
    # Not in eligible.csv: every loan there is eligible.
    LoanColumn("eligible", Kind.FLAG, Origin.VERDICT, in_report=False),
)

COLUMNS: dict[str, LoanColumn] = {column.name: column for column in LOAN_COLUMNS}
LOAN_COLUMN_NAMES: tuple[str, ...] = tuple(COLUMNS)
# The columns a tape must have, and those the pipeline computes (enrich).
REQUIRED_COLUMNS: tuple[str, ...] = tuple(c.name for c in LOAN_COLUMNS if c.origin is Origin.TAPE)
DERIVED_COLUMNS: tuple[str, ...] = tuple(c.name for c in LOAN_COLUMNS if c.origin is Origin.DERIVED)
REPORT_COLUMNS: tuple[LoanColumn, ...] = tuple(c for c in LOAN_COLUMNS if c.in_report)


def max_length(name: str) -> int:
    """The most characters column `name` stores (a TEXT or CODE column)."""
    length = COLUMNS[name].length
    if length is None:
        raise ValueError(f"{name} has no length")
    return length
