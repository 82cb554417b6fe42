"""Phase 7, report: `<output_prefix>summary.json`, `eligible.csv` and `exceptions.csv`.

Rows are written batch by batch (by `transform`, in the worker thread) to
spooled temporary files (memory up to a few MB, then disk) and streamed into
storage at the end, so the report never holds the run in memory and storage
never shows half a report.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from itertools import repeat
from operator import attrgetter
from typing import IO, Any

import orjson

from backend.pipeline.columns import REPORT_COLUMNS
from backend.pipeline.phases.base import BasePhase, Batch, LoanRow, RunContext

SPOOL_BYTES = 4 * 1024 * 1024
READ_CHARS = 1024 * 1024
ROW_SLICE = 1000

ELIGIBLE_HEADER = tuple(column.name for column in REPORT_COLUMNS)
EXCEPTIONS_HEADER = ("row_number", "loan_id", "severity", "rule_id", "field", "message")

_REPORT_VALUES = attrgetter(*ELIGIBLE_HEADER)
# (position, format spec) of the columns written through a format (money, rates, ratios).
_FORMATTED = tuple((i, c.report_format) for i, c in enumerate(REPORT_COLUMNS) if c.report_format)


def eligible_lines(rows: Sequence[LoanRow]) -> Iterator[list[tuple[Any, ...]]]:
    """The eligible.csv lines of `rows`' eligible loans, in ELIGIBLE_HEADER order, in
    slices of up to ROW_SLICE lines.

    Values are read by name and formatted per column kind a column at a time (C
    loops), a slice at a time, so no single call runs long.
    """
    eligible = [row for row in rows if row.eligible]
    for start in range(0, len(eligible), ROW_SLICE):
        part = eligible[start : start + ROW_SLICE]
        columns = list(zip(*map(_REPORT_VALUES, part), strict=True))
        for i, spec in _FORMATTED:
            columns[i] = tuple(map(format, columns[i], repeat(spec)))
        yield list(zip(*columns, strict=True))


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

    def transform(self, batch: Batch, ctx: RunContext) -> None:
        for lines in eligible_lines(batch.rows):
            self._eligible.writerows(lines)
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
