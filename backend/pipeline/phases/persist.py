"""Phase 6, persist: LoanFact and LoanException rows in bulk, in one transaction per run.

PostgreSQL takes each batch with binary COPY on the raw asyncpg connection
(`copy_records_to_table`), and the COPY of one batch overlaps the parsing and
checking of the next (one COPY in flight at a time, so memory stays at two
batches); the phase's duration is then the time the run waited on the
database. Other databases get one multi-row INSERT per batch. Either way
nothing is committed until `finish`, so a run that fails part-way leaves no
facts behind.

COPY and the driver-level BEGIN/COMMIT/ROLLBACK bypass SQLAlchemy, so its
instrumentation cannot see them: each gets a client span of its own here (one
per statement, i.e. per batch and table, never per row), under the phase span.
"""

from __future__ import annotations

import asyncio
import contextlib
from decimal import Decimal
from typing import Any

import anyio
import structlog
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.models import LoanException, LoanFact
from backend.pipeline.phases.base import BasePhase, Batch, RunContext
from backend.pipeline.tape import DERIVED_COLUMNS, REQUIRED_COLUMNS
from backend.pipeline.telemetry import db_span

logger = structlog.get_logger(__name__)

FACT_COLUMNS = ("run_id", "row_number", *REQUIRED_COLUMNS, *DERIVED_COLUMNS, "eligible")
EXCEPTION_COLUMNS = (
    "run_id",
    "seq",
    "row_number",
    "loan_id",
    "severity",
    "rule_id",
    "field",
    "message",
)
# The statements asyncpg sends for copy_records_to_table, as the spans show them.
COPY_FACTS = f"COPY loan_facts ({', '.join(FACT_COLUMNS)}) FROM STDIN (FORMAT binary)"
COPY_EXCEPTIONS = (
    f"COPY loan_exceptions ({', '.join(EXCEPTION_COLUMNS)}) FROM STDIN (FORMAT binary)"
)


class PersistPhase(BasePhase):
    name = "persist"

    def __init__(self) -> None:
        self._conn: AsyncConnection | None = None
        self._copy: Any = None  # the asyncpg connection when COPY is available
        self._transaction: Any = None
        self._seq = 0
        self._inflight: asyncio.Task[None] | None = None
        self._db_name = ""

    async def start(self, ctx: RunContext) -> None:
        self._conn = await ctx.database.engine.connect()
        if ctx.database.engine.dialect.name == "postgresql":
            raw = await self._conn.get_raw_connection()
            self._copy = raw.driver_connection
            self._db_name = ctx.database.engine.url.database or ""
            # The run's own transaction on the driver connection: SQLAlchemy's would
            # only begin lazily on its first statement, and COPY bypasses SQLAlchemy.
            self._transaction = self._copy.transaction()
            with self._span("BEGIN"):
                await self._transaction.start()
        else:
            self._transaction = await self._conn.begin()

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        run_id = ctx.run_id
        # Money columns are NUMERIC. Values are already rounded, so repr() is short and
        # exact; asyncpg encodes such a Decimal about 3x faster than it encodes a float.
        D = Decimal  # noqa: N806 (a local alias in the hot loop)
        facts = [
            (
                run_id,
                r.row_number,
                r.loan_id,
                r.borrower_id,
                D(repr(r.amount)),
                D(repr(r.rate)),
                r.term_months,
                r.credit_score,
                D(repr(r.annual_income)),
                D(repr(r.monthly_debt)),
                D(repr(r.property_value)),
                r.state,
                r.property_type,
                r.occupancy,
                r.origination_date,
                r.sales_team,
                D(repr(r.monthly_payment)),
                r.ltv,
                r.dti,
                r.grade,
                r.eligible,
            )
            for r in batch.rows
        ]
        start = self._seq
        problems = [
            (
                run_id,
                start + i + 1,
                e.row_number,
                e.loan_id,
                e.severity.value,
                e.rule_id,
                e.field,
                e.message,
            )
            for i, e in enumerate(batch.exceptions)
        ]
        self._seq += len(problems)
        ctx.counts.exceptions += len(problems)
        if self._copy is not None:
            await self._wait_inflight()
            self._inflight = asyncio.create_task(self._copy_batch(facts, problems))
            return
        assert self._conn is not None
        if facts:
            await self._conn.execute(
                insert(LoanFact), [dict(zip(FACT_COLUMNS, f, strict=True)) for f in facts]
            )
        if problems:
            await self._conn.execute(
                insert(LoanException),
                [dict(zip(EXCEPTION_COLUMNS, p, strict=True)) for p in problems],
            )

    async def _copy_batch(
        self, facts: list[tuple[Any, ...]], problems: list[tuple[Any, ...]]
    ) -> None:
        if facts:
            with self._span("COPY loan_facts", COPY_FACTS, len(facts)):
                await self._copy.copy_records_to_table(
                    "loan_facts", records=facts, columns=FACT_COLUMNS
                )
        if problems:
            with self._span("COPY loan_exceptions", COPY_EXCEPTIONS, len(problems)):
                await self._copy.copy_records_to_table(
                    "loan_exceptions", records=problems, columns=EXCEPTION_COLUMNS
                )

    def _span(self, operation: str, statement: str | None = None, rows: int | None = None) -> Any:
        """A client span for one driver-level statement (SQLAlchemy cannot see these)."""
        attributes: dict[str, Any] = {"db.name": self._db_name}
        if rows is not None:
            attributes["db.operation.batch.size"] = rows
        return db_span("postgresql", operation, statement or operation, **attributes)

    async def _wait_inflight(self) -> None:
        """Wait for the previous batch's COPY; its error, if any, surfaces here."""
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            await task

    async def finish(self, ctx: RunContext) -> None:
        await self._wait_inflight()
        if self._copy is not None:
            with self._span("COMMIT"):
                await self._transaction.commit()
        else:
            await self._transaction.commit()
        self._transaction = None
        await self._release()

    async def abort(self, ctx: RunContext) -> None:
        # Shielded: this runs while the run is being cancelled, and must still roll back.
        with anyio.CancelScope(shield=True):
            trusted = True
            if self._inflight is not None:
                if not self._inflight.done():
                    # A COPY cut off mid-stream leaves the protocol state unknown.
                    trusted = False
                    self._inflight.cancel()
                with contextlib.suppress(BaseException):
                    await self._inflight
                self._inflight = None
            try:
                if self._transaction is not None and trusted:
                    if self._copy is not None:
                        with self._span("ROLLBACK"):
                            await self._transaction.rollback()
                    else:
                        await self._transaction.rollback()
            except Exception as exc:
                trusted = False
                logger.warning("pipeline.persist.rollback_failed", error_type=type(exc).__name__)
            finally:
                self._transaction = None
                await self._release(trusted)

    async def _release(self, trusted: bool = True) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if not trusted:
                # Never hand a connection in an unknown state back to the pool: closing
                # it ends the server session, and with it the uncommitted transaction.
                await conn.invalidate()
            await conn.close()
