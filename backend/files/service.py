"""Upload checks (type, size, emptiness) and streaming into storage."""

from __future__ import annotations

import codecs
import hashlib
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from backend.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from backend.models import User
from backend.pagination import PageParams
from backend.scoping import creation_scope, is_unscoped_reader, readable_scopes
from backend.storage.base import (
    CHUNK_SIZE,
    FileInfo,
    Storage,
    StoragePath,
    StoredFileNotFound,
    parse_path,
    parse_prefix,
    sanitize_filename,
)

logger = structlog.get_logger(__name__)

ALLOWED_SUFFIXES = (".csv", ".csv.gz")
GZIP_MAGIC = b"\x1f\x8b"
SNIFF_BYTES = 64 * 1024
# Text control characters a CSV may contain; anything else below 0x20 means binary.
_ALLOWED_CONTROLS = frozenset("\r\n\t")

MEDIA_TYPES = {".csv": "text/csv", ".gz": "application/gzip", ".json": "application/json"}


# Every Content-Type a download can have.
DOWNLOAD_MEDIA_TYPES = (*MEDIA_TYPES.values(), "application/octet-stream")


def media_type(name: str) -> str:
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return MEDIA_TYPES.get(suffix, "application/octet-stream")


class EmptyUpload(BadRequest):
    code, message = "empty_file", "The uploaded file is empty"


class NotCsv(UnsupportedMediaType):
    message = "Only CSV files (.csv, optionally .csv.gz) are accepted"


def check_name(filename: str | None) -> str:
    """The sanitized stored name; 400 for traversal, 415 for a non-CSV extension."""
    name = sanitize_filename(filename or "")
    if not name.lower().endswith(ALLOWED_SUFFIXES):
        raise NotCsv()
    return name


def looks_like_csv(head: bytes, *, gzipped: bool) -> bool:
    """Whether the first bytes of a file read as CSV text with a comma-separated header.

    `head` may end in the middle of a line or a multi-byte character.
    """
    if gzipped:
        if not head.startswith(GZIP_MAGIC):
            return False
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, SNIFF_BYTES)
        except zlib.error:
            return False
    elif head.startswith(GZIP_MAGIC):
        return False
    try:
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(head[:SNIFF_BYTES], final=False)
    except UnicodeDecodeError:
        return False
    if any(ch < " " and ch not in _ALLOWED_CONTROLS for ch in text):
        return False
    header = text.split("\n", 1)[0]
    return "," in header


@dataclass
class _Tally:
    size: int = 0
    sha256: str = ""


async def _checked_chunks(
    source: AsyncIterator[bytes], *, gzipped: bool, max_bytes: int, tally: _Tally
) -> AsyncIterator[bytes]:
    """The upload's bytes, checked as they pass; raising here aborts the save."""
    digest = hashlib.sha256()
    first = True
    async for chunk in _rechunk(source):
        if first:
            if not looks_like_csv(chunk, gzipped=gzipped):
                raise NotCsv("The file content is not CSV text")
            first = False
        tally.size += len(chunk)
        if tally.size > max_bytes:
            raise PayloadTooLarge(f"Uploads are limited to {max_bytes // (1024 * 1024)} MB")
        digest.update(chunk)
        yield chunk
    if tally.size == 0:
        raise EmptyUpload()
    tally.sha256 = digest.hexdigest()


async def _rechunk(source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Network-sized pieces regrouped into CHUNK_SIZE chunks (the last may be shorter),
    so the content sniff sees a full first chunk and storage gets few large writes."""
    buffer = bytearray()
    async for piece in source:
        buffer += piece
        while len(buffer) >= CHUNK_SIZE:
            yield bytes(buffer[:CHUNK_SIZE])
            del buffer[:CHUNK_SIZE]
    if buffer:
        yield bytes(buffer)


async def store_upload(
    storage: Storage,
    user: User | None,
    filename: str | None,
    source: AsyncIterator[bytes],
    *,
    overwrite: bool,
    max_upload_mb: int,
) -> tuple[str, int, str]:
    """Stream a checked upload into `inputs/<scope>/` of `user` (backend/scoping.py);
    returns (path, size, sha256). No user (an operator on the command line): straight
    under `inputs/`, a path only admins read.

    The name is only ever compared with files of the uploader's own scope, so a
    conflict (or an overwrite) can only concern a file the uploader can read. Any
    failure (too large, not CSV, empty, client gone) leaves nothing stored.
    """
    name = check_name(filename)
    path = f"inputs/{creation_scope(user)}/{name}" if user is not None else f"inputs/{name}"
    tally = _Tally()
    chunks = _checked_chunks(
        source,
        gzipped=name.lower().endswith(".gz"),
        max_bytes=max_upload_mb * 1024 * 1024,
        tally=tally,
    )
    info = await storage.save(path, chunks, overwrite=overwrite)
    logger.info(
        "file.uploaded",
        path=info.path,
        size=info.size,
        overwrite=overwrite,
        owner_id=user.id if user is not None else None,
        sales_team_id=user.sales_team_id if user is not None else None,
    )
    return info.path, info.size, tally.sha256


# ------------------------------------------------------------------ scoping
# Every read of a stored file goes through these: the one place the files domain
# applies backend/scoping.py.


def readable_path(user: User, path: str) -> StoragePath:
    """`path`, checked (400 when malformed) and readable by `user`.

    A path outside the caller's scopes is StoredFileNotFound, the very 404 a
    missing file gets, so a file's existence never leaks.
    """
    checked = parse_path(path)
    if is_unscoped_reader(user):
        return checked
    scope = checked.key.split("/", 1)[0]
    if "/" not in checked.key or scope not in readable_scopes(user):
        raise StoredFileNotFound()
    return checked


async def stat_readable(storage: Storage, user: User, path: str) -> FileInfo:
    """The stored file at `path` when `user` may read it; 404 otherwise, missing or not."""
    return await storage.stat(str(readable_path(user, path)))


def _scoped_prefixes(user: User, prefix: str) -> list[str]:
    """The listing prefixes (in key order) that cover what `user` reads under `prefix`."""
    if is_unscoped_reader(user):
        return [prefix]
    prefixes = []
    for scope in readable_scopes(user):
        folder = f"{scope}/"
        if prefix.startswith(folder):
            prefixes.append(prefix)
        elif folder.startswith(prefix):
            prefixes.append(folder)
    return prefixes


async def list_readable(
    storage: Storage, user: User, area: str, prefix: str, page: PageParams
) -> tuple[list[FileInfo], int]:
    """One page of the files in `area` under `prefix` that `user` reads, by path, and
    how many there are in all.

    A non-admin's scopes are disjoint prefixes already in key order, so the page is
    read off their concatenation: one listing per scope, at most two.
    """
    area, prefix = parse_prefix(area, prefix)
    items: list[FileInfo] = []
    total = 0
    for scoped in _scoped_prefixes(user, prefix):
        # Where this scope's files start within the whole listing decides what to take.
        skip = max(page.offset - total, 0)
        want = page.limit - len(items)
        found, count = await storage.list(area, scoped, limit=max(want, 1), offset=skip)
        if want > 0:
            items.extend(found[:want])
        total += count
    return items, total
