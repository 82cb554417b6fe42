"""Phase 1, ingest: stream the tape from storage and cut it into batches of CSV records.

The file is never read whole: chunks are decoded incrementally and only
complete records (cut at a newline outside quotes) are parsed, so a quoted
field may contain newlines and still never straddles two batches. Reading a
chunk is I/O, on the event loop; inflating, decoding and parsing it is CPU
work, done in a worker thread (one hop per chunk).
"""

from __future__ import annotations

import codecs
import csv
import io
import zlib
from collections.abc import AsyncIterator
from functools import partial

from backend.pipeline.phases.base import BasePhase, Batch, PipelineFailure, RunContext, off_loop

# A record still open after this much text has an unterminated quote somewhere.
MAX_PENDING_CHARS = 16 * 1024 * 1024


def _complete_prefix(text: str) -> int:
    """Length of the longest prefix of `text` made of complete CSV records.

    A newline ends a record only outside quotes; since quotes inside fields are
    doubled, "outside" means an even number of `"` before it.
    """
    cut = text.rfind("\n")
    if cut < 0 or text.count('"', 0, cut) % 2 == 0:
        return cut + 1  # the usual case: the chunk ends outside any quotes
    # Rare: a quoted field spans the chunk end. One linear pass finds the last safe newline.
    best = 0
    quotes = 0
    position = 0
    for line in text.splitlines(keepends=True):
        quotes += line.count('"')
        position += len(line)
        if line.endswith("\n") and quotes % 2 == 0:
            best = position
    return best


class IngestPhase(BasePhase):
    name = "ingest"

    def __init__(self) -> None:
        self._chunks: AsyncIterator[bytes] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self._gunzip: zlib._Decompress | None = None
        self._pending = ""
        self._header: list[str] | None = None
        # Numbered rows parsed and not yet in a batch: those from `_taken` on.
        self._rows: list[tuple[int, tuple[str, ...]]] = []
        self._taken = 0
        self._eof = False
        self._bytes_read = 0
        self._row_number = 0

    async def start(self, ctx: RunContext) -> None:
        self._chunks = aiter(ctx.storage.open(ctx.input_path))
        if ctx.input_path.lower().endswith(".gz"):
            self._gunzip = zlib.decompressobj(wbits=31)
        while self._header is None and not self._eof:
            await self._read_more()
        if self._header is None:
            raise PipelineFailure("The tape is empty: it has no header row")
        ctx.header = [name.strip() for name in self._header]
        ctx.extra["bytes_read"] = self._bytes_read

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        size = ctx.settings.PIPELINE_BATCH_SIZE
        raw = batch.raw
        while len(raw) < size:
            if self._taken == len(self._rows):
                if self._eof:
                    ctx.exhausted = True
                    break
                await self._read_more()
                continue
            # One slice, not a Python loop per row: this runs on the event loop.
            end = min(len(self._rows), self._taken + size - len(raw))
            raw.extend(self._rows[self._taken : end])
            self._taken = end
        ctx.counts.total += len(raw)
        ctx.extra["bytes_read"] = self._bytes_read

    async def abort(self, ctx: RunContext) -> None:
        await self._close()

    async def finish(self, ctx: RunContext) -> None:
        await self._close()

    async def _close(self) -> None:
        closer = getattr(self._chunks, "aclose", None)
        if closer is not None:
            await closer()

    async def _read_more(self) -> None:
        assert self._chunks is not None
        try:
            chunk = await anext(self._chunks)
        except StopAsyncIteration:
            chunk = b""
            self._eof = True
        self._bytes_read += len(chunk)
        await off_loop(partial(self._parse, chunk))

    def _parse(self, chunk: bytes) -> None:
        """Number the complete records `chunk` ends and add them to the parsed rows;
        keep the rest pending (in the worker thread: this is the CPU work of ingest)."""
        data = chunk
        if self._gunzip is not None:
            try:
                data = self._gunzip.decompress(chunk) if chunk else self._gunzip.flush()
            except zlib.error:
                raise PipelineFailure("The tape is not a valid gzip file") from None
        try:
            text = self._decoder.decode(data, final=self._eof)
        except UnicodeDecodeError:
            raise PipelineFailure(
                f"The tape is not UTF-8 text (first bad byte near byte {self._bytes_read})"
            ) from None
        self._pending += text
        cut = len(self._pending) if self._eof else _complete_prefix(self._pending)
        if cut == 0:
            if len(self._pending) > MAX_PENDING_CHARS:
                raise PipelineFailure(
                    f"A quoted field after row {self._row_number} is never closed"
                )
            return
        complete, self._pending = self._pending[:cut], self._pending[cut:]
        # Rows already in batches go; then the new ones, numbered from 1 after the header.
        del self._rows[: self._taken]
        self._taken = 0
        rows = self._rows
        try:
            # A record at a time: draining the reader in one C call (list(), extend())
            # would hold the GIL, and so stall the event loop, for the whole chunk.
            for record in csv.reader(io.StringIO(complete, newline="")):
                if not record or record == [""]:
                    continue  # blank line: not a row
                if self._header is None:
                    self._header = record
                    continue
                self._row_number += 1
                rows.append((self._row_number, tuple(record)))
        except csv.Error as exc:
            raise PipelineFailure(
                f"The CSV after row {self._row_number} cannot be parsed: {exc}"
            ) from None
