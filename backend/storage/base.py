"""The storage protocol, its errors, and the one place storage paths are checked.

A storage path is `<area>/<key>`: the area is `inputs` (uploaded tapes) or
`outputs` (run reports), the key is one or more `/`-separated segments. Every
backend turns a caller's path into a `StoragePath` through `parse_path` before
touching anything, so a path that could escape its area never reaches a file
system or a bucket.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, get_args
from urllib.parse import unquote

from backend.errors import BadRequest, Conflict, NotFound

Area = Literal["inputs", "outputs"]
AREAS: tuple[str, ...] = get_args(Area)
CHUNK_SIZE = 1024 * 1024
MAX_PATH_LENGTH = 512
MAX_NAME_LENGTH = 160

# Anything not in this set becomes "_" when a client's file name is sanitized.
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DRIVE = re.compile(r"^[A-Za-z]:")
# The extension a sanitized name keeps: one or two short suffixes (".csv", ".csv.gz").
_KEPT_SUFFIX = re.compile(r"(?:\.[A-Za-z0-9]{1,8}){1,2}$")
_WINDOWS_DEVICE_NAMES = frozenset(
    ["CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10))]
)


class InvalidPath(BadRequest):
    """The path is malformed or tries to leave its storage area."""

    code, message = "invalid_path", "Invalid storage path"


class StoredFileNotFound(NotFound):
    code, message = "file_not_found", "File not found"


class StoredFileExists(Conflict):
    code, message = "file_exists", "A file with this name already exists"


@dataclass(frozen=True, slots=True)
class StoragePath:
    """A checked path: `area` plus a key made of safe, non-empty segments."""

    area: Area
    key: str

    def __str__(self) -> str:
        return f"{self.area}/{self.key}"

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class FileInfo:
    """What a backend knows about one stored file."""

    path: str
    area: Area
    name: str
    size: int
    modified_at: datetime


def _check_segments(text: str) -> list[str]:
    """The segments of `text`, refusing every form of escape we know of."""
    if not text or len(text) > MAX_PATH_LENGTH:
        raise InvalidPath("Path is empty or too long")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise InvalidPath("Path contains control characters")
    if "\\" in text:
        raise InvalidPath("Path contains a backslash")
    if text.startswith("/") or text.startswith("~") or _DRIVE.match(text):
        raise InvalidPath("Path must be relative")
    segments = text.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise InvalidPath("Path contains an empty, '.' or '..' segment")
    return segments


def parse_path(path: str, *, area: str | None = None) -> StoragePath:
    """Check `path` (`<area>/<key>`, or a bare key when `area` is given).

    Refused with `InvalidPath`: `..` and `.` segments, absolute paths, drive
    letters, backslashes, null bytes and other control characters, and any of
    these hidden behind percent-encoding (decoded repeatedly, so `%252e%252e`
    is caught too). The checks run on the text as given and on every decoding.
    """
    text = path
    for _ in range(4):
        _check_segments(text)
        decoded = unquote(text)
        if decoded == text:
            break
        text = decoded
    else:
        raise InvalidPath("Path is percent-encoded too many times")
    # NFKC folds look-alikes (e.g. full-width dots) into the characters checked above.
    folded = unicodedata.normalize("NFKC", path)
    if folded != path:
        _check_segments(folded)
        _check_segments(unquote(folded))
    segments = path.split("/")
    if area is not None:
        segments = [area, *segments]
    if segments[0] not in AREAS:
        raise InvalidPath(f"Path must start with one of: {', '.join(AREAS)}")
    if len(segments) < 2:
        raise InvalidPath("Path names an area, not a file")
    return StoragePath(area=segments[0], key="/".join(segments[1:]))  # type: ignore[arg-type]


def parse_prefix(area: str, prefix: str) -> tuple[Area, str]:
    """Check a listing prefix inside `area`; an empty prefix lists the whole area."""
    if area not in AREAS:
        raise InvalidPath(f"Area must be one of: {', '.join(AREAS)}")
    if prefix:
        # A prefix may end with "/" (a folder); check it as if it named a file inside.
        parse_path(prefix.rstrip("/") or ".", area=area)
    return area, prefix  # type: ignore[return-value]


def sanitize_filename(name: str) -> str:
    """A safe single-segment file name from a client-supplied one.

    Traversal attempts are refused (`InvalidPath`) rather than silently
    rewritten. Otherwise the result matches `[A-Za-z0-9][A-Za-z0-9._-]*`
    (at most MAX_NAME_LENGTH characters) or is `_` + a Windows device name:
    look-alike characters are folded (NFKC), others outside `A-Za-z0-9._-`
    become `_`, leading and trailing spaces and dots are dropped, and the
    extension (up to two short suffixes, e.g. `.csv.gz`) survives cleaning and
    cutting. A name with nothing left but its extension becomes `file<ext>`;
    a name with nothing left at all is refused.
    """
    checked = parse_path(name, area="inputs")
    if "/" in checked.key:
        raise InvalidPath("File name must not contain '/'")
    # Windows drops leading/trailing spaces and dots; left in, they can disguise the
    # extension ("tape.csv." is not a .csv file to us, but is one to the user).
    folded = unicodedata.normalize("NFKC", checked.key).strip(" .")
    cleaned = _UNSAFE_NAME_CHARS.sub("_", folded)
    # Searched from the second character: a name is never all extension (".csv").
    suffix = _KEPT_SUFFIX.search(cleaned, 1)
    ext = suffix.group() if suffix else ""
    stem = cleaned[: len(cleaned) - len(ext)].lstrip(".-_")
    if not stem:
        if not ext:
            raise InvalidPath("File name is empty after sanitizing")
        stem = "file"
    if stem.split(".", 1)[0].upper() in _WINDOWS_DEVICE_NAMES:
        # "CON.csv" cannot be saved on Windows: a client downloading it would fail.
        stem = "_" + stem
    return stem[: MAX_NAME_LENGTH - len(ext)] + ext


class Storage(Protocol):
    """A place for tapes and reports. Paths are `<area>/<key>` (see `parse_path`).

    Implementations never hold a whole file in memory: writes take and reads
    return async iterables of chunks.
    """

    async def save(
        self, path: str, chunks: AsyncIterable[bytes], *, overwrite: bool = False
    ) -> FileInfo:
        """Store `chunks` at `path`; all or nothing.

        Raises `StoredFileExists` when the path exists and `overwrite` is false.
        When the iterable raises, nothing is left at `path` (an earlier file
        there is kept) and the exception propagates.
        """
        ...

    def open(self, path: str) -> AsyncIterator[bytes]:
        """The file's bytes in chunks; `StoredFileNotFound` on first iteration if absent."""
        ...

    async def stat(self, path: str) -> FileInfo:
        """Size and modification time; `StoredFileNotFound` if absent."""
        ...

    async def exists(self, path: str) -> bool: ...

    async def delete(self, path: str) -> None:
        """Remove the file; `StoredFileNotFound` if absent."""
        ...

    async def list(
        self, area: str, prefix: str = "", *, limit: int = 50, offset: int = 0
    ) -> tuple[list[FileInfo], int]:
        """One page of files in `area` whose key starts with `prefix`, ordered by
        key, and the total number of matches."""
        ...

    async def close(self) -> None:
        """Release clients and connections."""
        ...
