"""Read one file field of a multipart/form-data request straight off the wire.

Starlette's form parsing spools a whole upload to a temporary file before the
route runs; here the request body is parsed as it arrives and the file's bytes
are handed on chunk by chunk, so an upload goes to storage without a detour,
and a refused one (too large, not CSV, name taken) stops being read at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from backend.errors import BadRequest, UnsupportedMediaType


class FileFieldStream:
    """The file sent in form field `field`: `await start()` for its file name,
    then iterate `chunks()` for its bytes. Other fields are skipped unread."""

    def __init__(self, request: Request, field: str = "file") -> None:
        content_type, options = parse_options_header(request.headers.get("content-type", ""))
        boundary = options.get(b"boundary")
        if content_type != b"multipart/form-data" or not boundary:
            raise UnsupportedMediaType("Expected a multipart/form-data body with a 'file' field")
        self._body = aiter(request.stream())
        self._field = field.encode()
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._in_file = False
        self._file_started = False
        self._file_done = False
        self._data: deque[bytes] = deque()
        self.filename: str | None = None
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    # Parser callbacks: they only record what they see; the async side acts on it.
    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = b""
        self._header_value = b""

    def _on_headers_finished(self) -> None:
        _disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if (
            not self._file_started
            and options.get(b"name") == self._field
            and b"filename" in options
        ):
            self._in_file = self._file_started = True
            self.filename = options[b"filename"].decode("utf-8", errors="replace")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._data.append(data[start:end])

    def _on_part_end(self) -> None:
        if self._in_file:
            self._in_file = False
            self._file_done = True

    async def _feed(self) -> bool:
        """Parse the next piece of the body; False when the body has ended."""
        try:
            chunk = await anext(self._body)
        except StopAsyncIteration:
            return False
        if chunk:
            try:
                self._parser.write(chunk)
            except Exception:
                raise BadRequest("The multipart body is malformed") from None
        return True

    async def start(self) -> str:
        """Read up to the file part's headers and return the client's file name."""
        while not self._file_started:
            if not await self._feed():
                raise BadRequest("The form has no 'file' field with a file name")
        return self.filename or ""

    async def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes as they arrive; BadRequest if the body ends before the file."""
        while True:
            while self._data:
                yield self._data.popleft()
            if self._file_done:
                return
            if not await self._feed():
                raise BadRequest("The upload ended before the file was complete")
