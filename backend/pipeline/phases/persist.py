"""Phase 6, persist: LoanFact and LoanException rows in bulk, in one transaction per run.

`transform` turns a batch into what the database takes (in the worker thread);
`process` sends it. PostgreSQL takes each batch with COPY on the raw asyncpg
connection, and the COPY of one batch overlaps the parsing and checking of
the next (one COPY in flight at a time, so memory stays at two batches); the
phase's duration is then the time the run waited on the database, plus
preparing the data. Other databases get one multi-row INSERT per batch.
Either way nothing is committed until `finish`, so a run that fails part-way
leaves no facts behind.

The COPY is in CSV, written by `transform`: the event loop only ships bytes.
(Binary COPY records are encoded by asyncpg on the loop, about 10 us a loan,
which would hold the loop for 50 ms a batch.) csv writes floats as repr(), so
money and rates reach NUMERIC exact and ratios reach double precision exact,
dates as ISO text, booleans as True/False, and None as an empty unquoted
field, which is NULL. An empty text is therefore NULL too: the phases never
produce one in a nullable column (normalize turns an empty sales_team into
None), and the NOT NULL text columns are FORCE_NOT_NULL, so there an empty
text stays empty, as in the table.

COPY and the driver-level BEGIN/COMMIT/ROLLBACK bypass SQLAlchemy, so its
instrumentation cannot see them: each gets a client span of its own here (one
per statement, i.e. per batch and table, never per row), under the phase span.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from decimal import Decimal
from operator import attrgetter
from typing import Any

import anyio
import structlog
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from backend.models import LoanException, LoanFact, PipelineRun, RunStatus
from backend.pipeline.columns import LOAN_COLUMN_NAMES, LOAN_COLUMNS, Kind
from backend.pipeline.phases.base import BasePhase, Batch, LeaseLost, LoanRow, RunContext
from backend.pipeline.telemetry import db_span

logger = structlog.get_logger(__name__)

FACT_COLUMNS = ("run_id", *LOAN_COLUMN_NAMES)
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
CLEAR_FACTS = "DELETE FROM loan_facts WHERE run_id = $1"
CLEAR_EXCEPTIONS = "DELETE FROM loan_exceptions WHERE run_id = $1"
LOCK_OWNED_RUN = (
    "SELECT 1 FROM pipeline_runs WHERE id = $1 AND owner = $2 AND status = 'running' FOR UPDATE"
)
# Text columns where an empty field is an empty text, not NULL.
FACT_NOT_NULL = tuple(
    c.name for c in LOAN_COLUMNS if c.kind in (Kind.TEXT, Kind.CODE) and not c.nullable
)
EXCEPTION_NOT_NULL = ("severity", "rule_id", "message")


def _copy_statement(table: str, columns: Sequence[str], not_null: Sequence[str]) -> str:
    """The statement asyncpg sends for copy_to_table(format="csv", force_not_null=...),
    as the spans show it."""
    return (
        f"COPY {table} ({', '.join(columns)}) FROM STDIN "
        f"(FORMAT csv, FORCE_NOT_NULL ({', '.join(not_null)}))"
    )


COPY_FACTS = _copy_statement("loan_facts", FACT_COLUMNS, FACT_NOT_NULL)
COPY_EXCEPTIONS = _copy_statement("loan_exceptions", EXCEPTION_COLUMNS, EXCEPTION_NOT_NULL)

_LOAN_VALUES = attrgetter(*LOAN_COLUMN_NAMES)
# Where the NUMERIC columns (money, rates) sit among a loan's values.
_NUMERIC_AT = tuple(i for i, c in enumerate(LOAN_COLUMNS) if c.kind in (Kind.MONEY, Kind.RATE))
RECORD_SLICE = 1000
SEND_BYTES = 256 * 1024


def _fact_columns(run_id: Any, rows: Sequence[LoanRow]) -> Iterable[list[tuple[Any, ...]]]:
    """The loan_facts columns (FACT_COLUMNS order) of `rows`, each value read by name,
    a slice of rows at a time, built with C loops, none of them long."""
    for start in range(0, len(rows), RECORD_SLICE):
        part = rows[start : start + RECORD_SLICE]
        yield [(run_id,) * len(part), *zip(*map(_LOAN_VALUES, part), strict=True)]


def fact_records(run_id: uuid.UUID, rows: Sequence[LoanRow]) -> list[tuple[Any, ...]]:
    """One loan_facts record per row, for INSERT. NUMERIC columns go as Decimal (the
    values are already rounded, so repr() is short and exact)."""
    records: list[tuple[Any, ...]] = []
    for columns in _fact_columns(run_id, rows):
        for i in _NUMERIC_AT:
            columns[i + 1] = tuple(map(Decimal, map(repr, columns[i + 1])))
        records.extend(zip(*columns, strict=True))
    return records


def fact_csv(run_id: uuid.UUID, rows: Sequence[LoanRow]) -> bytes:
    """loan_facts rows as COPY CSV, in FACT_COLUMNS order (see the module docstring)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for columns in _fact_columns(str(run_id), rows):
        writer.writerows(zip(*columns, strict=True))
    return out.getvalue().encode()


def exception_csv(records: Sequence[tuple[Any, ...]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for start in range(0, len(records), RECORD_SLICE):
        writer.writerows(records[start : start + RECORD_SLICE])
    return out.getvalue().encode()


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), SEND_BYTES):
        yield data[start : start + SEND_BYTES]


class PersistPhase(BasePhase):
    name = "persist"

    def __init__(self) -> None:
        self._conn: AsyncConnection | None = None
        self._copy: Any = None  # the asyncpg connection when COPY is available
        self._transaction: Any = None
        self._seq = 0
        self._inflight: asyncio.Task[None] | None = None
        self._db_name = ""
        # What `transform` prepared for `process` to send: COPY CSV (with row counts,
        # for the spans) or INSERT records.
        self._csv: tuple[bytes, int, bytes, int] = (b"", 0, b"", 0)
        self._records: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] = ([], [])

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
        if ctx.attempt > 1:
            # An earlier execution of this run may have committed its rows and then
            # died before recording the outcome: they are replaced, in this transaction.
            await self._clear_previous(ctx.run_id)

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        run_id = ctx.run_id
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
            facts = fact_csv(run_id, batch.rows)
            self._csv = (facts, len(batch.rows), exception_csv(problems), len(problems))
        else:
            self._records = (fact_records(run_id, batch.rows), problems)

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        if self._copy is not None:
            data, self._csv = self._csv, (b"", 0, b"", 0)
            await self._wait_inflight()
            self._inflight = asyncio.create_task(self._copy_batch(*data))
            return
        (facts, problems), self._records = self._records, ([], [])
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

    async def _copy_batch(self, facts: bytes, fact_rows: int, problems: bytes, rows: int) -> None:
        if fact_rows:
            with self._span("COPY loan_facts", COPY_FACTS, fact_rows):
                await self._copy.copy_to_table(
                    "loan_facts",
                    source=_pieces(facts),
                    columns=FACT_COLUMNS,
                    format="csv",
                    force_not_null=FACT_NOT_NULL,
                )
        if rows:
            with self._span("COPY loan_exceptions", COPY_EXCEPTIONS, rows):
                await self._copy.copy_to_table(
                    "loan_exceptions",
                    source=_pieces(problems),
                    columns=EXCEPTION_COLUMNS,
                    format="csv",
                    force_not_null=EXCEPTION_NOT_NULL,
                )

    async def _clear_previous(self, run_id: uuid.UUID) -> None:
        if self._copy is not None:
            for statement in (CLEAR_FACTS, CLEAR_EXCEPTIONS):
                with self._span("DELETE", statement):
                    await self._copy.execute(statement, run_id)
            return
        assert self._conn is not None
        await self._conn.execute(delete(LoanFact).where(LoanFact.run_id == run_id))
        await self._conn.execute(delete(LoanException).where(LoanException.run_id == run_id))

    async def _still_owner(self, run_id: uuid.UUID, owner: str) -> bool:
        if self._copy is not None:
            with self._span("SELECT", LOCK_OWNED_RUN):
                return await self._copy.fetchrow(LOCK_OWNED_RUN, run_id, owner) is not None
        assert self._conn is not None
        # SQLite: the transaction already holds the database's write lock.
        found = await self._conn.scalar(
            select(PipelineRun.id).where(
                PipelineRun.id == run_id,
                PipelineRun.owner == owner,
                PipelineRun.status == RunStatus.RUNNING,
            )
        )
        return found is not None

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
        # Commit only while still the owner. The row lock keeps anyone from taking the
        # run over between this check and the commit.
        if ctx.owner is not None and not await self._still_owner(ctx.run_id, ctx.owner):
            raise LeaseLost()
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
