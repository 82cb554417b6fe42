"""Storage in a folder on the local file system (STORAGE_LOCAL_ROOT)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import anyio.to_thread
import structlog

from backend.storage.base import (
    AREAS,
    CHUNK_SIZE,
    FileInfo,
    InvalidPath,
    StoragePath,
    StoredFileExists,
    StoredFileNotFound,
    parse_path,
    parse_prefix,
)

# Uploads are written here first and moved into place when complete, so a failed
# or oversized upload never shows up as a file. Outside both areas: never listed.
PARTIAL_DIR = ".partial"


logger = structlog.get_logger(__name__)


class LocalStorage:
    """Files under `root/<area>/<key>`; every path is resolved by `_resolve`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        try:
            for area in (*AREAS, PARTIAL_DIR):
                (self.root / area).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # Start anyway: readiness reports the storage unhealthy, and operations
            # answer 503 until the volume is fixed, instead of the process crash-looping.
            logger.error("storage.local.unavailable", error_type=type(exc).__name__)

    def _resolve(self, path: str) -> tuple[StoragePath, Path]:
        """The checked path and its location, which must stay inside its area.

        `parse_path` refuses textual escapes; resolving symlinks here refuses a
        link (anywhere along the path) that points outside the area.
        """
        checked = parse_path(path)
        area_root = self.root / checked.area
        target = area_root / checked.key
        real = Path(os.path.realpath(target))
        if not real.is_relative_to(area_root.resolve()) or real == area_root.resolve():
            raise InvalidPath("Path leaves its storage area")
        return checked, real

    def _info(self, checked: StoragePath, location: Path) -> FileInfo:
        try:
            st = location.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise StoredFileNotFound() from None
        if not location.is_file():
            raise StoredFileNotFound()
        return FileInfo(
            path=str(checked),
            area=checked.area,
            name=checked.name,
            size=st.st_size,
            modified_at=datetime.fromtimestamp(st.st_mtime, UTC),
        )

    async def save(
        self, path: str, chunks: AsyncIterable[bytes], *, overwrite: bool = False
    ) -> FileInfo:
        checked, location = self._resolve(path)
        if not overwrite and await self.exists(path):
            raise StoredFileExists()
        partial = self.root / PARTIAL_DIR / f"{uuid.uuid4().hex}.part"
        handle: BinaryIO = await anyio.to_thread.run_sync(partial.open, "wb")
        try:
            try:
                async for chunk in chunks:
                    await anyio.to_thread.run_sync(handle.write, chunk)
            finally:
                await anyio.to_thread.run_sync(handle.close)
            await anyio.to_thread.run_sync(self._publish, partial, location, overwrite)
        finally:
            # After a successful publish the partial name is gone; otherwise clean it up.
            partial.unlink(missing_ok=True)
        return await self.stat(str(checked))

    @staticmethod
    def _publish(partial: Path, location: Path, overwrite: bool) -> None:
        location.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            os.replace(partial, location)
            return
        try:
            # link() fails when the name exists: no window for a concurrent upload to clobber.
            os.link(partial, location)
        except FileExistsError:
            raise StoredFileExists() from None

    async def open(self, path: str) -> AsyncIterator[bytes]:
        _checked, location = self._resolve(path)
        try:
            handle: BinaryIO = await anyio.to_thread.run_sync(location.open, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StoredFileNotFound() from None
        try:
            while chunk := await anyio.to_thread.run_sync(handle.read, CHUNK_SIZE):
                yield chunk
        finally:
            handle.close()

    async def stat(self, path: str) -> FileInfo:
        checked, location = self._resolve(path)
        return await anyio.to_thread.run_sync(self._info, checked, location)

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except StoredFileNotFound:
            return False
        return True

    async def delete(self, path: str) -> None:
        _checked, location = self._resolve(path)
        if not location.is_file():
            raise StoredFileNotFound()
        try:
            await anyio.to_thread.run_sync(location.unlink)
        except FileNotFoundError:
            raise StoredFileNotFound() from None

    def _scan(self, area: str, prefix: str) -> list[FileInfo]:
        area_root = self.root / area
        found: list[FileInfo] = []
        # followlinks=False: a symlinked folder is never walked into.
        for folder, dirs, files in os.walk(area_root, followlinks=False):
            dirs.sort()
            for name in files:
                full = Path(folder) / name
                key = full.relative_to(area_root).as_posix()
                if not key.startswith(prefix) or full.is_symlink():
                    continue
                try:
                    found.append(self._info(parse_path(key, area=area), full))
                except (InvalidPath, StoredFileNotFound):
                    continue
        found.sort(key=lambda info: info.path)
        return found

    async def list(
        self, area: str, prefix: str = "", *, limit: int = 50, offset: int = 0
    ) -> tuple[list[FileInfo], int]:
        area, prefix = parse_prefix(area, prefix)
        found = await anyio.to_thread.run_sync(self._scan, area, prefix)
        return found[offset : offset + limit], len(found)

    async def close(self) -> None:
        return None
