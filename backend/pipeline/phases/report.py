"""Phase 7, report: `<output_prefix>summary.json`, `eligible.csv` and `exceptions.csv`.

Rows are written batch by batch to spooled temporary files (memory up to a
few MB, then disk) and streamed into storage at the end, so the report never
holds the run in memory and storage never shows half a report.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from backend.pipeline.phases.base import BasePhase, Batch, RunContext
from backend.pipeline.tape import DERIVED_COLUMNS, REQUIRED_COLUMNS

SPOOL_BYTES = 4 * 1024 * 1024
READ_CHARS = 1024 * 1024

ELIGIBLE_HEADER = ("row_number", *REQUIRED_COLUMNS, *DERIVED_COLUMNS)
EXCEPTIONS_HEADER = ("row_number", "loan_id", "severity", "rule_id", "field", "message")


async def _encoded(handle: IO[str]) -> AsyncIterator[bytes]:
    handle.seek(0)
    while text := handle.read(READ_CHARS):
        yield text.encode("utf-8")


class ReportPhase(BasePhase):
    name = "report"

    def __init__(self) -> None:
        self._files: list[IO[str]] = []
        self._eligible: Any = None
        self._exceptions: Any = None

    def _spool(self) -> IO[str]:
        handle = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed in _close)
            max_size=SPOOL_BYTES, mode="w+", newline="", encoding="utf-8"
        )
        self._files.append(handle)
        return handle

    async def start(self, ctx: RunContext) -> None:
        self._eligible = csv.writer(self._spool())
        self._exceptions = csv.writer(self._spool())
        self._eligible.writerow(ELIGIBLE_HEADER)
        self._exceptions.writerow(EXCEPTIONS_HEADER)

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        self._eligible.writerows(
            (
                r.row_number,
                r.loan_id,
                r.borrower_id,
                f"{r.amount:.2f}",
                f"{r.rate:.6f}",
                r.term_months,
                r.credit_score,
                f"{r.annual_income:.2f}",
                f"{r.monthly_debt:.2f}",
                f"{r.property_value:.2f}",
                r.state,
                r.property_type,
                r.occupancy,
                r.origination_date,
                r.sales_team or "",
                f"{r.monthly_payment:.2f}",
                f"{r.ltv:.4f}",
                f"{r.dti:.4f}",
                r.grade,
            )
            for r in batch.rows
            if r.eligible
        )
        self._exceptions.writerows(
            (e.row_number, e.loan_id or "", e.severity.value, e.rule_id, e.field or "", e.message)
            for e in batch.exceptions
        )

    async def finish(self, ctx: RunContext) -> None:
        prefix = ctx.output_prefix
        eligible_file, exceptions_file = self._files
        await ctx.storage.save(f"{prefix}eligible.csv", _encoded(eligible_file), overwrite=True)
        await ctx.storage.save(f"{prefix}exceptions.csv", _encoded(exceptions_file), overwrite=True)
        summary = {
            "run_id": str(ctx.run_id),
            "input_path": ctx.input_path,
            "generated_at": datetime.now(UTC).isoformat(),
            "counts": ctx.counts.as_dict(),
            "rule_failures": dict(sorted(ctx.rule_failures.items())),
            "phase_seconds": {k: round(v, 4) for k, v in ctx.durations.items()},
            "files": [f"{prefix}eligible.csv", f"{prefix}exceptions.csv"],
        }
        body = orjson.dumps(summary, option=orjson.OPT_INDENT_2)

        async def one_chunk() -> AsyncIterator[bytes]:
            yield body

        await ctx.storage.save(f"{prefix}summary.json", one_chunk(), overwrite=True)
        self._close()

    async def abort(self, ctx: RunContext) -> None:
        self._close()

    def _close(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []
