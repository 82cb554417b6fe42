"""Phase 1, ingest: stream the tape from storage and cut it into batches of CSV records.

The file is never read whole: chunks are decoded incrementally and only
complete records (cut at a newline outside quotes) are parsed, so a quoted
field may contain newlines and still never straddles two batches.
"""

from __future__ import annotations

import codecs
import csv
import io
import zlib
from collections import deque
from collections.abc import AsyncIterator

from backend.pipeline.phases.base import BasePhase, Batch, PipelineFailure, RunContext

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
        self._records: deque[list[str]] = deque()
        self._eof = False
        self._bytes_read = 0
        self._row_number = 0

    async def start(self, ctx: RunContext) -> None:
        self._chunks = aiter(ctx.storage.open(ctx.input_path))
        if ctx.input_path.lower().endswith(".gz"):
            self._gunzip = zlib.decompressobj(wbits=31)
        header: list[str] = []
        while not header:
            while not self._records and not self._eof:
                await self._read_more()
            if not self._records:
                raise PipelineFailure("The tape is empty: it has no header row")
            header = self._records.popleft()  # blank lines before the header are skipped
            if header == [""]:
                header = []
        ctx.header = [name.strip() for name in header]
        ctx.extra["bytes_read"] = self._bytes_read

    async def process(self, batch: Batch, ctx: RunContext) -> None:
        size = ctx.settings.PIPELINE_BATCH_SIZE
        raw = batch.raw
        while len(raw) < size:
            if not self._records:
                if self._eof:
                    ctx.exhausted = True
                    break
                await self._read_more()
                continue
            record = self._records.popleft()
            if not record or record == [""]:
                continue  # blank line: not a row
            self._row_number += 1
            raw.append((self._row_number, record))
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
        try:
            self._records.extend(csv.reader(io.StringIO(complete, newline="")))
        except csv.Error as exc:
            raise PipelineFailure(
                f"The CSV after row {self._row_number} cannot be parsed: {exc}"
            ) from None
