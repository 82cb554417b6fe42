"""Each phase on its own: ingest, validate, normalize, enrich, eligibility, persist, report."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select

from backend.config import Settings
from backend.database import Database
from backend.migrations.runner import upgrade
from backend.models import LoanException, LoanFact, PipelineRun, RunStatus, Severity
from backend.pipeline.eligibility import build_rules, failed_rules
from backend.pipeline.engine import PipelineEngine
from backend.pipeline.phases.base import (
    Batch,
    ExceptionRecord,
    LoanRow,
    PipelineFailure,
    RunContext,
)
from backend.pipeline.phases.eligibility import EligibilityPhase
from backend.pipeline.phases.enrich import EnrichPhase, grade
from backend.pipeline.phases.ingest import IngestPhase
from backend.pipeline.phases.normalize import NormalizePhase
from backend.pipeline.phases.persist import PersistPhase
from backend.pipeline.phases.validate import ValidatePhase
from backend.pipeline.tape import REQUIRED_COLUMNS
from backend.storage.local import LocalStorage
from backend.tests.conftest import make_settings
from backend.tests.pipeline_support import through

HEADER = ",".join(REQUIRED_COLUMNS)
GOOD = "L1,B1,200000,6.0,360,700,120000,500,250000,CA,SFR,PRIMARY,2024-01-15,Pacific"


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def context(
    settings: Settings, storage: Any = None, database: Any = None, path: str = ""
) -> RunContext:
    return RunContext(
        run_id=uuid.uuid4(),
        input_path=path,
        output_prefix="outputs/x/",
        settings=settings,
        storage=storage,
        database=database,
    )


async def ingest_all(
    tmp_path: Path, content: bytes, *, name: str = "t.csv", batch_size: int = 1000
) -> tuple[RunContext, list[Batch]]:
    storage = LocalStorage(tmp_path / "root")
    await storage.save(f"inputs/{name}", body(content))
    settings = make_settings(PIPELINE_BATCH_SIZE=batch_size)
    ctx = context(settings, storage, path=f"inputs/{name}")
    phase = IngestPhase()
    await phase.start(ctx)
    batches: list[Batch] = []
    while not ctx.exhausted:
        batch = Batch(index=len(batches))
        await phase.process(batch, ctx)
        batches.append(batch)
    await phase.finish(ctx)
    return ctx, batches


# --- ingest -----------------------------------------------------------------------------


async def test_ingest_batches_across_tiny_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 7-byte chunks: records, quoted commas and quoted newlines all straddle chunk ends.
    monkeypatch.setattr("backend.storage.local.CHUNK_SIZE", 7)
    rows = [f'L{i},B{i},"1,{i}","multi\nline {i}"' for i in range(1, 24)]
    content = ("\ufeffa,b,c,d\r\n" + "\r\n".join(rows) + "\r\n\r\n").encode()
    ctx, batches = await ingest_all(tmp_path, content, batch_size=5)
    assert ctx.header == ["a", "b", "c", "d"]
    assert [len(b.raw) for b in batches] == [5, 5, 5, 5, 3]
    records = [r for b in batches for r in b.raw]
    assert [n for n, _ in records] == list(range(1, 24))
    assert records[10][1] == ("L11", "B11", "1,11", "multi\nline 11")
    assert ctx.counts.total == 23


async def test_ingest_skips_blank_lines_and_reads_gzip(tmp_path: Path) -> None:
    content = f"{HEADER}\n\n{GOOD}\n\n{GOOD}\n".encode()
    ctx, batches = await ingest_all(tmp_path, gzip.compress(content), name="t.csv.gz")
    assert ctx.header == list(REQUIRED_COLUMNS)
    assert [n for b in batches for n, _ in b.raw] == [1, 2]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (b"", "t.csv", "The tape is empty"),
        (b"\n\n", "t.csv", "The tape is empty"),
        (b"a,b\n\xc3\x28,1\n", "t.csv", "The tape is not UTF-8 text"),
        (b"a,b\n1,2\n", "t.csv.gz", "The tape is not a valid gzip file"),
    ],
)
async def test_ingest_failures(tmp_path: Path, content: bytes, name: str, message: str) -> None:
    with pytest.raises(PipelineFailure) as failure:
        await ingest_all(tmp_path, content, name=name)
    assert failure.value.message.startswith(message)


# --- validate ---------------------------------------------------------------------------


async def validate(header: str, *lines: str) -> tuple[RunContext, Batch]:
    ctx = context(make_settings())
    import csv

    ctx.header = next(csv.reader([header]))
    raw = [(i, tuple(next(csv.reader([line])))) for i, line in enumerate(lines, 1)]
    batch = Batch(index=0, raw=raw)
    phase = ValidatePhase()
    await phase.start(ctx)
    await through(phase, batch, ctx)
    return ctx, batch


async def test_validate_matches_columns_by_name_in_any_order() -> None:
    names = list(REQUIRED_COLUMNS)
    values = GOOD.split(",")
    order = list(reversed(range(len(names))))
    header = "Extra," + ",".join(names[i].upper() for i in order)
    line = "ignored," + ",".join(values[i] for i in order)
    _ctx, batch = await validate(header, line)
    assert batch.exceptions == []
    row = batch.rows[0]
    assert (row.loan_id, row.amount, row.term_months, row.credit_score) == ("L1", 200000, 360, 700)
    assert batch.raw == []


async def test_validate_missing_and_repeated_columns_fail_the_run() -> None:
    with pytest.raises(PipelineFailure) as missing:
        await validate("loan_id,amount")
    assert missing.value.message.startswith(
        "The tape is missing required columns: borrower_id, rate"
    )
    with pytest.raises(PipelineFailure) as repeated:
        await validate(HEADER + ",amount")
    assert repeated.value.message == "The tape repeats columns: amount"


def with_value(column: str, value: str) -> str:
    values = GOOD.split(",")
    values[REQUIRED_COLUMNS.index(column)] = value
    return ",".join(values)


@pytest.mark.parametrize(
    ("column", "value", "rule_id"),
    [
        ("loan_id", " ", "missing_value"),
        ("loan_id", "X" * 65, "value_too_long"),
        ("borrower_id", "", "missing_value"),
        ("amount", "abc", "invalid_number"),
        ("amount", "0", "out_of_range"),
        ("amount", "-5", "out_of_range"),
        ("amount", "nan", "out_of_range"),
        ("amount", "1e999", "out_of_range"),
        ("rate", "", "missing_value"),
        ("rate", "26", "out_of_range"),
        ("term_months", "30.5", "invalid_number"),
        ("term_months", "0", "out_of_range"),
        ("credit_score", "299", "out_of_range"),
        ("credit_score", "851", "out_of_range"),
        ("annual_income", "0", "out_of_range"),
        ("monthly_debt", "-1", "out_of_range"),
        ("property_value", "zero", "invalid_number"),
        ("state", "CAL", "invalid_value"),
        ("state", "C1", "invalid_value"),
        ("property_type", "", "missing_value"),
        ("occupancy", "O" * 33, "value_too_long"),
        ("origination_date", "2024-02-30", "invalid_date"),
        ("origination_date", "15/01/2024", "invalid_date"),
        ("origination_date", "2999-01-01", "out_of_range"),
        ("origination_date", "1899-12-31", "out_of_range"),
        ("sales_team", "T" * 101, "value_too_long"),
    ],
)
async def test_validate_bad_values_become_error_exceptions(
    column: str, value: str, rule_id: str
) -> None:
    ctx, batch = await validate(HEADER, with_value(column, value), GOOD.replace("L1", "L2"))
    assert [r.loan_id for r in batch.rows] == ["L2"]
    assert len(batch.exceptions) == 1
    problem = batch.exceptions[0]
    assert (problem.row_number, problem.severity, problem.rule_id, problem.field) == (
        1,
        Severity.ERROR,
        rule_id,
        column,
    )
    assert ctx.counts.rejected == 1


async def test_validate_reports_every_problem_of_a_row_and_wrong_widths() -> None:
    bad = with_value("amount", "x").replace("700", "9999")
    ctx, batch = await validate(HEADER, bad, "L3,B3,1", GOOD, GOOD)
    found = [(e.row_number, e.rule_id, e.field) for e in batch.exceptions]
    assert found == [
        (1, "invalid_number", "amount"),
        (1, "out_of_range", "credit_score"),
        (2, "malformed_row", None),
        (4, "duplicate_loan_id", "loan_id"),
    ]
    assert batch.exceptions[2].message == "expected 14 fields, found 3"
    assert [r.row_number for r in batch.rows] == [3]
    assert ctx.counts.rejected == 3


# --- normalize, enrich -------------------------------------------------------------------


def loan(**changes: Any) -> LoanRow:
    values: dict[str, Any] = {
        "row_number": 1,
        "loan_id": " L1 ",
        "borrower_id": " B1",
        "amount": 200000.004,
        "rate": 6.0,
        "term_months": 360,
        "credit_score": 700,
        "annual_income": 120000,
        "monthly_debt": 500,
        "property_value": 250000,
        "state": " ca ",
        "property_type": "single  family",
        "occupancy": "owner occupied",
        "origination_date": "03/15/2024",
        "sales_team": "   ",
    }
    values.update(changes)
    return LoanRow(**values)


async def test_normalize_canonical_values() -> None:
    batch = Batch(index=0, rows=[loan(), loan(property_type="Condominium", occupancy="investor")])
    await through(NormalizePhase(), batch, context(make_settings()))
    first, second = batch.rows
    assert (first.loan_id, first.borrower_id, first.state) == ("L1", "B1", "CA")
    assert (first.property_type, first.occupancy) == ("SFR", "PRIMARY")
    assert (second.property_type, second.occupancy) == ("CONDO", "INVESTMENT")
    assert first.rate == 0.06
    assert first.amount == 200000.0
    assert first.origination_date == date(2024, 3, 15)
    assert first.sales_team is None


async def test_enrich_payment_ltv_dti_grade() -> None:
    rows = [
        loan(rate=0.06),
        loan(rate=0.0, amount=120000.0, term_months=120),
        loan(rate=0.06, credit_score=760, property_value=300000),
    ]
    batch = Batch(index=0, rows=rows)
    await through(EnrichPhase(), batch, context(make_settings()))
    first, zero, third = batch.rows
    assert first.monthly_payment == 1199.10
    assert (first.ltv, first.dti, first.grade) == (0.8, 0.1699, "B")
    assert zero.monthly_payment == 1000.0
    assert zero.dti == 0.15
    assert (third.ltv, third.grade) == (0.6667, "A")


@pytest.mark.parametrize(
    ("score", "ltv", "dti", "expected"),
    [
        (740, 0.80, 0.36, "A"),
        (739, 0.80, 0.36, "B"),
        (740, 0.81, 0.36, "B"),
        (700, 0.90, 0.43, "B"),
        (700, 0.91, 0.30, "C"),
        (660, 0.97, 0.50, "C"),
        (659, 0.50, 0.10, "D"),
    ],
)
def test_grade(score: int, ltv: float, dti: float, expected: str) -> None:
    assert grade(score, ltv, dti) == expected


# --- eligibility -------------------------------------------------------------------------


def enriched(**changes: Any) -> LoanRow:
    values: dict[str, Any] = {
        "loan_id": "L1",
        "amount": 200000.0,
        "rate": 0.06,
        "state": "CA",
        "property_type": "SFR",
        "occupancy": "PRIMARY",
        "origination_date": date(2024, 1, 1),
        "sales_team": None,
        "ltv": 0.8,
        "dti": 0.2,
    }
    values.update(changes)
    row = loan(**{k: v for k, v in values.items() if k not in ("ltv", "dti")})
    row.ltv, row.dti = values["ltv"], values["dti"]
    return row


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        ({}, []),
        ({"credit_score": 620, "ltv": 0.97, "dti": 0.43, "amount": 766550.0}, []),
        ({"credit_score": 619}, ["min_credit_score"]),
        ({"dti": 0.4301}, ["max_dti"]),
        ({"ltv": 0.9701}, ["max_ltv"]),
        ({"amount": 766550.01}, ["max_amount"]),
        ({"term_months": 300}, ["allowed_term"]),
        ({"property_type": "MANUFACTURED"}, ["allowed_property_type"]),
        ({"state": "PR"}, ["allowed_state"]),
        ({"credit_score": 500, "state": "GU"}, ["min_credit_score", "allowed_state"]),
    ],
)
def test_each_rule_and_its_boundary(changes: dict[str, Any], failed: list[str]) -> None:
    rules = build_rules(make_settings())
    assert [r.id for r in failed_rules(rules, enriched(**changes))] == failed


def test_thresholds_come_from_settings() -> None:
    settings = make_settings(
        ELIGIBILITY_MIN_CREDIT_SCORE=700,
        ELIGIBILITY_ALLOWED_TERMS="180,360",
        ELIGIBILITY_ALLOWED_STATES="ca,ny",
        ELIGIBILITY_ALLOWED_PROPERTY_TYPES="sfr",
    )
    rules = build_rules(settings)
    row = enriched(credit_score=690, term_months=240, state="TX", property_type="CONDO")
    failed = failed_rules(rules, row)
    assert [r.id for r in failed] == [
        "min_credit_score",
        "allowed_term",
        "allowed_property_type",
        "allowed_state",
    ]
    assert failed[0].explain(row) == "credit score 690 is below the minimum 700"
    assert failed[1].explain(row) == "term 240 months is not one of [180, 360]"


async def test_eligibility_phase_records_rule_exceptions() -> None:
    ctx = context(make_settings())
    phase = EligibilityPhase()
    await phase.start(ctx)
    batch = Batch(index=0, rows=[enriched(), enriched(row_number=2, loan_id="L2", ltv=1.2)])
    await through(phase, batch, ctx)
    assert [r.eligible for r in batch.rows] == [True, False]
    (problem,) = batch.exceptions
    assert (problem.row_number, problem.loan_id, problem.severity, problem.rule_id) == (
        2,
        "L2",
        Severity.RULE,
        "max_ltv",
    )
    assert problem.message == "LTV 1.2000 is above the maximum 0.97"
    assert (ctx.counts.eligible, ctx.counts.ineligible, ctx.rule_failures["max_ltv"]) == (1, 1, 1)


# --- persist and the whole engine ---------------------------------------------------------


async def count_rows(database: Database, run_id: uuid.UUID) -> tuple[int, int]:
    async with database.session() as session:
        facts = await session.scalar(
            select(func.count()).select_from(LoanFact).where(LoanFact.run_id == run_id)
        )
        problems = await session.scalar(
            select(func.count()).select_from(LoanException).where(LoanException.run_id == run_id)
        )
    return facts or 0, problems or 0


async def new_run(database: Database) -> uuid.UUID:
    run_id = uuid.uuid4()
    async with database.session() as session:
        session.add(PipelineRun(id=run_id, status=RunStatus.RUNNING, input_path="inputs/t.csv"))
    return run_id


async def test_persist_rolls_back_on_abort(settings: Settings) -> None:
    database = Database(settings)
    try:
        run_id = await new_run(database)
        ctx = context(settings, database=database)
        ctx.run_id = run_id
        row = enriched()
        row.monthly_payment, row.grade = 1199.1, "B"
        batch = Batch(index=0, rows=[row])
        phase = PersistPhase()
        await phase.start(ctx)
        await through(phase, batch, ctx)
        await phase.abort(ctx)
        assert await count_rows(database, run_id) == (0, 0)

        phase = PersistPhase()
        await phase.start(ctx)
        await through(phase, batch, ctx)
        assert await count_rows(database, run_id) == (0, 0)  # not visible before commit
        await phase.finish(ctx)
        assert await count_rows(database, run_id) == (1, 0)
    finally:
        await database.dispose()


AWKWARD_TEXT = [
    "Pacific, North",
    'say "hi"',
    "Mountain\nand Coast",
    "line\r\nbreak",
    "a\n\\.\nb",  # COPY's end-of-data marker alone on a line, inside a value
    "\\.",
    "\\N",
    "NULL",
    " padded ",
    "\t",
    "é€😀",
]


async def test_persist_keeps_any_text_exact_and_none_null(settings: Settings) -> None:
    database = Database(settings)
    try:
        run_id = await new_run(database)
        ctx = context(settings, database=database)
        ctx.run_id = run_id
        rows = []
        for n, team in enumerate([*AWKWARD_TEXT, None], start=1):
            row = enriched(row_number=n, loan_id=f"L{n}", sales_team=team)
            row.monthly_payment, row.grade = 1199.1, "B"
            rows.append(row)
        problems = [
            ExceptionRecord(n, None, Severity.ERROR, "rule", None, text)
            for n, text in enumerate(AWKWARD_TEXT, start=1)
        ]
        phase = PersistPhase()
        await phase.start(ctx)
        await through(phase, Batch(index=0, rows=rows, exceptions=problems), ctx)
        await phase.finish(ctx)
        async with database.session() as session:
            teams = await session.scalars(
                select(LoanFact.sales_team)
                .where(LoanFact.run_id == run_id)
                .order_by(LoanFact.row_number)
            )
            assert list(teams) == [*AWKWARD_TEXT, None]
            stored = await session.execute(
                select(LoanException.loan_id, LoanException.field, LoanException.message)
                .where(LoanException.run_id == run_id)
                .order_by(LoanException.seq)
            )
            assert list(stored) == [(None, None, text) for text in AWKWARD_TEXT]
    finally:
        await database.dispose()


async def test_engine_on_sqlite_uses_plain_inserts(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'p.db'}"
    await anyio.to_thread.run_sync(upgrade, url)
    settings = make_settings(DATABASE_URL=url, PIPELINE_BATCH_SIZE=2)
    database = Database(settings)
    storage = LocalStorage(tmp_path / "root")
    lines = [HEADER, GOOD, GOOD.replace("L1", "L2").replace(",700,", ",500,"), "L3,bad"]
    await storage.save("inputs/t.csv", body(("\n".join(lines) + "\n").encode()))
    try:
        run_id = await new_run(database)
        result = await PipelineEngine(database, storage, settings).execute(run_id, "inputs/t.csv")
        assert result.counts.as_dict() == {
            "total": 3,
            "eligible": 1,
            "ineligible": 1,
            "rejected": 1,
            "exceptions": 2,
        }
        assert await count_rows(database, run_id) == (2, 2)
        summary = b"".join([c async for c in storage.open(f"outputs/{run_id}/summary.json")])
        assert json.loads(summary)["counts"]["eligible"] == 1
    finally:
        await database.dispose()


def test_pipeline_settings_defaults_and_bounds() -> None:
    from pydantic import ValidationError

    settings = make_settings()
    assert (settings.PIPELINE_MAX_CONCURRENT_RUNS, settings.PIPELINE_DRAIN_SECONDS) == (2, 30)
    assert settings.ELIGIBILITY_ALLOWED_TERMS == [120, 180, 240, 360]
    assert len(settings.ELIGIBILITY_ALLOWED_STATES) == 51
    for bad in ({"PIPELINE_MAX_CONCURRENT_RUNS": 0}, {"PIPELINE_BATCH_SIZE": 0}):
        with pytest.raises(ValidationError):
            make_settings(**bad)
    with pytest.raises(ValidationError):
        make_settings(ELIGIBILITY_ALLOWED_TERMS="120,thirty")
