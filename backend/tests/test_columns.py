"""One definition of the loan columns: every consumer follows LOAN_COLUMNS by name.

Each test gives every column a value no other column has, then reads it back
by name at the consumer (the database, the API model, eligible.csv, LoanRow),
so a consumer that drifts (a column moved, renamed, dropped or swapped with
another of the same type) fails here.
"""

from __future__ import annotations

import csv
import io
import uuid
from dataclasses import fields
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import Boolean, Date, Float, Integer, Numeric, String, Uuid, bindparam, text

from backend.config import Settings
from backend.database import Database
from backend.migrations.runner import upgrade
from backend.models import LoanFact, PipelineRun, RunStatus
from backend.pipeline.columns import (
    DERIVED_COLUMNS,
    LOAN_COLUMN_NAMES,
    LOAN_COLUMNS,
    REQUIRED_COLUMNS,
    Kind,
    LoanColumn,
    Origin,
)
from backend.pipeline.phases.base import Batch, LoanRow, RunContext
from backend.pipeline.phases.persist import FACT_COLUMNS, PersistPhase
from backend.pipeline.phases.report import ELIGIBLE_HEADER, ReportPhase
from backend.pipeline.phases.validate import ValidatePhase
from backend.pipeline.schemas import FactRead
from backend.pipeline.tape import generate_tape
from backend.storage.local import LocalStorage
from backend.tests.conftest import make_settings
from backend.tests.pipeline_support import through


def distinct(column: LoanColumn, n: int) -> Any:
    """The n-th column's value: of the column's kind, and unlike any other column's."""
    match column.kind:
        case Kind.TEXT | Kind.CODE:
            return f"{n:02d}"  # fits every length, including the two-character codes
        case Kind.MONEY:
            return float(f"{n}.{n:02d}")
        case Kind.RATE:
            return float(f"0.{n:02d}{n:02d}")
        case Kind.RATIO:
            return float(f"0.{n:04d}")
        case Kind.INT:
            return 300 + n  # a term in months and a credit score the tape accepts
        case Kind.DATE:
            return date(2020, 1, n)
        case Kind.FLAG:
            return True
    raise AssertionError(column.kind)


VALUES: dict[str, Any] = {c.name: distinct(c, n) for n, c in enumerate(LOAN_COLUMNS, start=1)}


def distinct_row(**changes: Any) -> LoanRow:
    return LoanRow(**{**VALUES, **changes})


def context(settings: Settings, database: Any = None, storage: Any = None) -> RunContext:
    return RunContext(
        run_id=uuid.uuid4(),
        input_path="inputs/t.csv",
        output_prefix="outputs/x/",
        settings=settings,
        storage=storage,
        database=database,
    )


# --- the definition and the typed copies of it -----------------------------------------


def test_the_definition() -> None:
    assert len(set(LOAN_COLUMN_NAMES)) == len(LOAN_COLUMNS)
    assert LOAN_COLUMN_NAMES[0] == "row_number"
    assert [c.name for c in LOAN_COLUMNS if c.key] == ["row_number"]
    assert tuple(c.name for c in LOAN_COLUMNS if c.origin is Origin.TAPE) == REQUIRED_COLUMNS
    assert DERIVED_COLUMNS == ("monthly_payment", "ltv", "dti", "grade")
    for column in LOAN_COLUMNS:
        has_length = column.kind in (Kind.TEXT, Kind.CODE)
        assert (column.length is not None) == has_length, column.name
    assert len(set(VALUES.values())) == len(VALUES)


def test_loan_row_has_the_columns_in_order() -> None:
    assert tuple(f.name for f in fields(LoanRow)) == LOAN_COLUMN_NAMES


SQL_TYPES = {
    Kind.TEXT: String,
    Kind.CODE: String,
    Kind.MONEY: Numeric,
    Kind.RATE: Numeric,
    Kind.RATIO: Float,
    Kind.INT: Integer,
    Kind.DATE: Date,
    Kind.FLAG: Boolean,
}


def test_loan_fact_table_and_annotations_have_the_columns() -> None:
    table = LoanFact.__table__
    assert tuple(table.columns.keys()) == ("run_id", *LOAN_COLUMN_NAMES)
    assert tuple(table.primary_key.columns.keys()) == ("run_id", "row_number")
    for spec in LOAN_COLUMNS:
        column = table.columns[spec.name]
        assert type(column.type) is SQL_TYPES[spec.kind], spec.name
        assert column.nullable == spec.nullable, spec.name
        if spec.length is not None:
            assert column.type.length == spec.length, spec.name  # type: ignore[attr-defined]
    # The annotations that type LoanFact name the same columns, in the same order.
    assert tuple(LoanFact.__annotations__) == ("run_id", *LOAN_COLUMN_NAMES)
    nullable = {n for n, a in LoanFact.__annotations__.items() if "None" in a}
    assert nullable == {c.name for c in LOAN_COLUMNS if c.nullable}
    assert ("run_id", *LOAN_COLUMN_NAMES) == FACT_COLUMNS


API_TYPES = {
    Kind.TEXT: str,
    Kind.CODE: str,
    Kind.MONEY: float,
    Kind.RATE: float,
    Kind.RATIO: float,
    Kind.INT: int,
    Kind.DATE: date,
    Kind.FLAG: bool,
}


def test_fact_read_has_the_columns() -> None:
    assert tuple(FactRead.model_fields) == LOAN_COLUMN_NAMES
    for spec in LOAN_COLUMNS:
        field = FactRead.model_fields[spec.name]
        assert field.is_required(), spec.name
        expected = API_TYPES[spec.kind]
        assert field.annotation == (expected | None if spec.nullable else expected), spec.name
    assert FactRead.__name__ == "FactRead"  # the schema's name in the OpenAPI document


# --- the tape: generated in the definition's order, read by name -------------------------


def test_generated_tape_follows_the_required_columns() -> None:
    header, *rows = generate_tape(200, seed=5, malformed_share=0)
    assert tuple(header) == REQUIRED_COLUMNS
    for row in rows:
        named = dict(zip(header, row, strict=True))
        assert named["loan_id"].startswith("L") and named["borrower_id"].startswith("B")
        assert len(named["state"]) == 2 and named["state"].isalpha()
        date.fromisoformat(named["origination_date"])
        assert int(named["term_months"]) in {60, 120, 180, 240, 300, 360, 480}
        assert 500 <= int(named["credit_score"]) <= 820


async def test_validate_reads_every_column_by_name() -> None:
    tape_values = {
        c.name: "CA" if c.name == "state" else VALUES[c.name]
        for c in LOAN_COLUMNS
        if c.origin is Origin.TAPE
    }
    order = list(reversed(REQUIRED_COLUMNS))
    ctx = context(make_settings())
    ctx.header = ["extra", *(name.upper() for name in order)]
    raw = ("x", *(str(tape_values[name]) for name in order))
    batch = Batch(index=0, raw=[(7, raw)])
    phase = ValidatePhase()
    await phase.start(ctx)
    await through(phase, batch, ctx)
    assert batch.exceptions == []
    (row,) = batch.rows
    assert row.row_number == 7
    for name, value in tape_values.items():
        read = getattr(row, name)
        # Validate checks; normalize converts (the date stays text until then).
        assert read == (str(value) if isinstance(value, date) else value), name


# --- persist: each value lands in the database column of its name ------------------------


def expected_in_database(column: LoanColumn, value: Any) -> Any:
    return Decimal(repr(value)) if column.kind in (Kind.MONEY, Kind.RATE) else value


async def persist_one(settings: Settings, row: LoanRow) -> tuple[dict[str, Any], dict[str, Any]]:
    """Persist `row` through the real phase; the stored row by column name, and as the API
    shows it."""
    database = Database(settings)
    try:
        run_id = uuid.uuid4()
        async with database.session() as session:
            session.add(PipelineRun(id=run_id, status=RunStatus.RUNNING, input_path="inputs/t"))
        ctx = context(settings, database)
        ctx.run_id = run_id
        phase = PersistPhase()
        await phase.start(ctx)
        await through(phase, Batch(index=0, rows=[row]), ctx)
        await phase.finish(ctx)
        async with database.session() as session:
            # Every column by the name the database gives it, not through the ORM mapping.
            everything = text("SELECT * FROM loan_facts WHERE run_id = :run_id")
            result = await session.execute(
                everything.bindparams(bindparam("run_id", type_=Uuid())), {"run_id": run_id}
            )
            (stored,) = result.mappings().all()
            fact = await session.get(LoanFact, (run_id, row.row_number))
            assert fact is not None
            api = FactRead.model_validate(fact).model_dump()
        return dict(stored), api
    finally:
        await database.dispose()


async def test_persist_stores_each_value_in_its_column_on_postgres(settings: Settings) -> None:
    stored, api = await persist_one(settings, distinct_row())
    assert set(stored) == {"run_id", *LOAN_COLUMN_NAMES}
    for column in LOAN_COLUMNS:
        value = VALUES[column.name]
        assert stored[column.name] == expected_in_database(column, value), column.name
        assert api[column.name] == value, column.name


def as_sqlite_returns(column: LoanColumn, value: Any) -> Any:
    match column.kind:
        case Kind.MONEY | Kind.RATE:
            return float(value)
        case Kind.DATE:
            return value.isoformat()
        case Kind.FLAG:
            return int(value)
    return value


async def test_persist_stores_each_value_in_its_column_on_sqlite(tmp_path: Path) -> None:
    # Not PostgreSQL: persist sends multi-row INSERTs instead of COPY.
    url = f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"
    await anyio.to_thread.run_sync(upgrade, url)
    stored, api = await persist_one(make_settings(DATABASE_URL=url), distinct_row())
    for column in LOAN_COLUMNS:
        value = VALUES[column.name]
        assert stored[column.name] == as_sqlite_returns(column, value), column.name
        assert api[column.name] == value, column.name


# --- report: eligible.csv columns by header name ------------------------------------------


async def test_eligible_csv_writes_each_value_under_its_header(tmp_path: Path) -> None:
    ctx = context(make_settings(), storage=LocalStorage(tmp_path))
    phase = ReportPhase()
    await phase.start(ctx)
    rows = [
        distinct_row(),
        distinct_row(row_number=2, eligible=False),
        distinct_row(sales_team=None),
    ]
    await through(phase, Batch(index=0, rows=rows), ctx)
    await phase.finish(ctx)
    content = (tmp_path / "outputs" / "x" / "eligible.csv").read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(content, newline=""))
    assert tuple(reader.fieldnames or ()) == ELIGIBLE_HEADER
    assert tuple(c.name for c in LOAN_COLUMNS if c.in_report) == ELIGIBLE_HEADER
    first, without_team = list(reader)  # the ineligible loan is not there
    written = {
        "row_number": "301",
        "loan_id": "02",
        "amount": "4.04",
        "rate": "0.050500",
        "origination_date": "2020-01-14",
        "ltv": "0.0017",
    }
    for name, expected in written.items():
        assert first[name] == expected, name
    for column in LOAN_COLUMNS:
        if column.in_report:
            assert first[column.name] == format(VALUES[column.name], column.report_format)
    assert without_team["sales_team"] == ""
