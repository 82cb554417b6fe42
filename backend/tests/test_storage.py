"""One contract, two backends: local folder and S3 (moto's real HTTP server)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backend.storage.base import (
    FileInfo,
    InvalidPath,
    Storage,
    StoredFileExists,
    StoredFileNotFound,
    parse_path,
    sanitize_filename,
)
from backend.storage.local import PARTIAL_DIR, LocalStorage
from backend.storage.s3 import PART_SIZE, S3Storage


@pytest.fixture(params=["local", "s3"])
async def storage(
    request: pytest.FixtureRequest, tmp_path: Path, moto_endpoint: str
) -> AsyncIterator[Storage]:
    backend: Storage
    if request.param == "local":
        backend = LocalStorage(tmp_path / "root")
    else:
        bucket = request.getfixturevalue("s3_bucket")
        backend = S3Storage(bucket, prefix="tenant-a", endpoint_url=moto_endpoint)
    yield backend
    await backend.close()


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def read_all(storage: Storage, path: str) -> bytes:
    return b"".join([chunk async for chunk in storage.open(path)])


class Boom(RuntimeError):
    pass


async def failing(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    raise Boom("client went away")


TRAVERSALS = [
    "inputs/../outputs/x.csv",
    "../etc/passwd",
    "inputs/../../etc/passwd",
    "/etc/passwd",
    "/inputs/a.csv",
    "inputs//a.csv",
    "inputs/./a.csv",
    "inputs\\..\\a.csv",
    "inputs/a\\b.csv",
    "inputs/%2e%2e/%2e%2e/etc/passwd",
    "inputs/%2E%2E%2Fsecret",
    "inputs/%252e%252e/secret",
    "inputs/..%2fsecret",
    "inputs/a%00.csv",
    "inputs/a\x00.csv",
    "inputs/a\n.csv",
    "C:/Windows/win.ini",
    "inputs/\uff0e\uff0e/secret",
    "secrets/a.csv",
    "inputs",
    "",
]


async def test_save_open_stat_roundtrip(storage: Storage) -> None:
    info = await storage.save("inputs/tapes/a.csv", chunks(b"loan_id,amount\n", b"L1,100\n"))
    assert (info.path, info.area, info.name, info.size) == (
        "inputs/tapes/a.csv",
        "inputs",
        "a.csv",
        22,
    )
    assert await read_all(storage, "inputs/tapes/a.csv") == b"loan_id,amount\nL1,100\n"
    assert (await storage.stat("inputs/tapes/a.csv")).size == 22
    assert await storage.exists("inputs/tapes/a.csv")
    assert not await storage.exists("outputs/tapes/a.csv")


async def test_large_file_streams_in_chunks(storage: Storage) -> None:
    # Past one S3 part, so the multipart path runs on S3 and many chunks are read back.
    block = os.urandom(1024 * 1024)
    count = PART_SIZE // len(block) + 2
    await storage.save("inputs/big.bin.csv", chunks(*([block] * count)))
    expected = hashlib.sha256(block * count).hexdigest()
    digest = hashlib.sha256()
    pieces = 0
    async for chunk in storage.open("inputs/big.bin.csv"):
        digest.update(chunk)
        pieces += 1
    assert digest.hexdigest() == expected
    assert pieces > 1
    assert (await storage.stat("inputs/big.bin.csv")).size == count * len(block)


async def test_existing_name_conflicts_unless_overwrite(storage: Storage) -> None:
    await storage.save("inputs/a.csv", chunks(b"one"))
    with pytest.raises(StoredFileExists):
        await storage.save("inputs/a.csv", chunks(b"two"))
    assert await read_all(storage, "inputs/a.csv") == b"one"
    await storage.save("inputs/a.csv", chunks(b"three"), overwrite=True)
    assert await read_all(storage, "inputs/a.csv") == b"three"


@pytest.mark.parametrize("size", [3, PART_SIZE + 3], ids=["one-put", "multipart"])
async def test_two_uploads_of_one_name_cannot_both_succeed(storage: Storage, size: int) -> None:
    """Both uploads pass the early "exists?" check before either writes; the second to
    write must lose. (The writes are ordered: moto's own conditional check is not atomic
    against two requests at the same instant; S3's is.)"""
    both_checked = asyncio.Barrier(2)
    first_written = asyncio.Event()

    async def first_body() -> AsyncIterator[bytes]:
        await both_checked.wait()  # a body is read only after its name was checked
        yield b"a" * size

    async def second_body() -> AsyncIterator[bytes]:
        await both_checked.wait()
        await first_written.wait()
        yield b"b" * size

    async def first() -> FileInfo:
        try:
            return await storage.save("inputs/race.csv", first_body())
        finally:
            first_written.set()

    won, lost = await asyncio.gather(
        first(),
        storage.save("inputs/race.csv", second_body()),
        return_exceptions=True,
    )
    assert isinstance(won, FileInfo) and won.size == size, won
    assert isinstance(lost, StoredFileExists), lost
    assert await read_all(storage, "inputs/race.csv") == b"a" * size
    listed, total = await storage.list("inputs")
    assert [info.path for info in listed] == ["inputs/race.csv"] and total == 1


async def test_failed_save_leaves_nothing(storage: Storage) -> None:
    with pytest.raises(Boom):
        await storage.save("inputs/broken.csv", failing(b"a" * 1000, b"b" * 1000))
    assert not await storage.exists("inputs/broken.csv")
    assert (await storage.list("inputs"))[1] == 0


async def test_failed_multipart_save_leaves_nothing(storage: Storage) -> None:
    block = b"x" * (1024 * 1024)
    parts = [block] * (PART_SIZE // len(block) + 1)
    with pytest.raises(Boom):
        await storage.save("inputs/huge.csv", failing(*parts))
    assert not await storage.exists("inputs/huge.csv")


async def test_failed_overwrite_keeps_the_old_file(storage: Storage) -> None:
    await storage.save("inputs/a.csv", chunks(b"original"))
    with pytest.raises(Boom):
        await storage.save("inputs/a.csv", failing(b"new"), overwrite=True)
    assert await read_all(storage, "inputs/a.csv") == b"original"


async def test_missing_files(storage: Storage) -> None:
    with pytest.raises(StoredFileNotFound):
        await storage.stat("inputs/nope.csv")
    with pytest.raises(StoredFileNotFound):
        await read_all(storage, "inputs/nope.csv")
    with pytest.raises(StoredFileNotFound):
        await storage.delete("inputs/nope.csv")


async def test_delete(storage: Storage) -> None:
    await storage.save("outputs/r/summary.json", chunks(b"{}"))
    await storage.delete("outputs/r/summary.json")
    assert not await storage.exists("outputs/r/summary.json")


async def test_list_prefix_pagination_and_areas(storage: Storage) -> None:
    for name in ["b.csv", "a.csv", "2026/c.csv", "2026/d.csv", "2027/e.csv"]:
        await storage.save(f"inputs/{name}", chunks(name.encode()))
    await storage.save("outputs/run/x.csv", chunks(b"x"))

    items, total = await storage.list("inputs")
    assert total == 5
    assert [i.path for i in items] == [
        "inputs/2026/c.csv",
        "inputs/2026/d.csv",
        "inputs/2027/e.csv",
        "inputs/a.csv",
        "inputs/b.csv",
    ]
    page, total = await storage.list("inputs", limit=2, offset=2)
    assert total == 5
    assert [i.name for i in page] == ["e.csv", "a.csv"]
    items, total = await storage.list("inputs", "2026/")
    assert (total, [i.name for i in items]) == (2, ["c.csv", "d.csv"])
    items, total = await storage.list("outputs")
    assert (total, items[0].path, items[0].size) == (1, "outputs/run/x.csv", 1)


@pytest.mark.parametrize("path", TRAVERSALS)
async def test_traversal_is_refused_everywhere(storage: Storage, path: str) -> None:
    with pytest.raises(InvalidPath):
        await storage.save(path, chunks(b"x"))
    with pytest.raises(InvalidPath):
        await read_all(storage, path)
    with pytest.raises(InvalidPath):
        await storage.stat(path)
    with pytest.raises(InvalidPath):
        await storage.delete(path)


@pytest.mark.parametrize("prefix", ["../", "%2e%2e/", "a\\b", "/abs"])
async def test_list_refuses_bad_prefixes(storage: Storage, prefix: str) -> None:
    with pytest.raises(InvalidPath):
        await storage.list("inputs", prefix)
    with pytest.raises(InvalidPath):
        await storage.list("elsewhere")


async def test_symlinks_escaping_the_root_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("top,secret\n")
    storage = LocalStorage(tmp_path / "root")
    os.symlink(outside / "secret.csv", storage.root / "inputs" / "link.csv")
    os.symlink(outside, storage.root / "inputs" / "linkdir")
    for path in ("inputs/link.csv", "inputs/linkdir/secret.csv"):
        with pytest.raises(InvalidPath):
            await read_all(storage, path)
        with pytest.raises(InvalidPath):
            await storage.save(path, chunks(b"overwrite"), overwrite=True)
        with pytest.raises(InvalidPath):
            await storage.delete(path)
    # Never listed either, and the outside file is untouched.
    assert (await storage.list("inputs"))[1] == 0
    assert (outside / "secret.csv").read_text() == "top,secret\n"


async def test_local_failed_save_leaves_no_partial_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(Boom):
        await storage.save("inputs/x.csv", failing(b"abc"))
    assert list((storage.root / PARTIAL_DIR).iterdir()) == []
    assert list((storage.root / "inputs").iterdir()) == []


def test_parse_path_accepts_ordinary_names() -> None:
    assert str(parse_path("inputs/2026/tape v1.csv")) == "inputs/2026/tape v1.csv"
    assert parse_path("a.csv", area="outputs").area == "outputs"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("tape.csv", "tape.csv"),
        ("my tape (1).csv", "my_tape_1_.csv"),
        (".hidden.csv", "hidden.csv"),
        ("r\u00e9sum\u00e9.csv", "r_sum_.csv"),
        ("a" * 300 + ".csv", "a" * 156 + ".csv"),
    ],
)
def test_sanitize_filename(given: str, expected: str) -> None:
    assert sanitize_filename(given) == expected


@pytest.mark.parametrize("name", ["../x.csv", "a/b.csv", "..", "%2e%2e%2fx.csv", "a\\b.csv", ""])
def test_sanitize_filename_refuses_traversal(name: str) -> None:
    with pytest.raises(InvalidPath):
        sanitize_filename(name)
