"""Storage in an S3 bucket (STORAGE_TYPE=s3), or any S3-compatible endpoint.

boto3 is blocking, so every call runs in a worker thread; the event loop never
waits on the network.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any, TypeVar

import anyio.to_thread
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from backend.storage.base import (
    CHUNK_SIZE,
    FileInfo,
    InvalidPath,
    StoragePath,
    StoredFileExists,
    StoredFileNotFound,
    parse_path,
    parse_prefix,
)

T = TypeVar("T")

# S3 multipart parts must be at least 5 MiB (except the last); 8 MiB bounds memory per upload.
PART_SIZE = 8 * 1024 * 1024
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


# A create-only write (`IfNoneMatch="*"`) lost to an object already there (412), or to
# another conditional write of the same key still in flight (409).
_TAKEN = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})


def _is_missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


def _is_taken(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _TAKEN


class S3Storage:
    """Objects at `s3://<bucket>/<prefix>/<area>/<key>`."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3_BUCKET must be set when STORAGE_TYPE=s3")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client(
            "s3",
            region_name=region,
            endpoint_url=endpoint_url or None,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}),
        )

    async def _call(self, func: Callable[..., T], /, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(func, **kwargs))

    def _key(self, checked: StoragePath) -> str:
        return f"{self.prefix}/{checked}" if self.prefix else str(checked)

    def _strip(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    async def save(
        self, path: str, chunks: AsyncIterable[bytes], *, overwrite: bool = False
    ) -> FileInfo:
        checked = parse_path(path)
        key = self._key(checked)
        if not overwrite and await self.exists(path):
            raise StoredFileExists()  # early, before any byte is sent
        # The check above can race another upload of the same name: the write itself
        # is conditional, so of two create-only writes exactly one succeeds.
        create_only: dict[str, str] = {} if overwrite else {"IfNoneMatch": "*"}
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                buffer += chunk
                if len(buffer) >= PART_SIZE:
                    if upload_id is None:
                        created = await self._call(
                            self.client.create_multipart_upload, Bucket=self.bucket, Key=key
                        )
                        upload_id = created["UploadId"]
                    parts.append(await self._upload_part(key, upload_id, len(parts) + 1, buffer))
                    buffer = bytearray()
            if upload_id is None:
                # Small file: one PUT. Nothing is visible under `key` before it succeeds.
                await self._call(
                    self.client.put_object,
                    Bucket=self.bucket,
                    Key=key,
                    Body=bytes(buffer),
                    **create_only,
                )
            else:
                if buffer:
                    parts.append(await self._upload_part(key, upload_id, len(parts) + 1, buffer))
                await self._call(
                    self.client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **create_only,
                )
        except ClientError as exc:
            await self._abort(key, upload_id)
            if _is_taken(exc):
                raise StoredFileExists() from None
            raise
        except BaseException:
            await self._abort(key, upload_id)
            raise
        return await self.stat(path)

    async def _abort(self, key: str, upload_id: str | None) -> None:
        if upload_id is not None:
            # An aborted multipart upload never becomes an object.
            with anyio.CancelScope(shield=True):
                await self._call(
                    self.client.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                )

    async def _upload_part(
        self, key: str, upload_id: str, number: int, data: bytearray
    ) -> dict[str, Any]:
        result = await self._call(
            self.client.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=bytes(data),
        )
        return {"ETag": result["ETag"], "PartNumber": number}

    async def open(self, path: str) -> AsyncIterator[bytes]:
        checked = parse_path(path)
        try:
            response = await self._call(
                self.client.get_object, Bucket=self.bucket, Key=self._key(checked)
            )
        except ClientError as exc:
            if _is_missing(exc):
                raise StoredFileNotFound() from None
            raise
        body = response["Body"]
        try:
            while chunk := await anyio.to_thread.run_sync(body.read, CHUNK_SIZE):
                yield chunk
        finally:
            body.close()

    async def stat(self, path: str) -> FileInfo:
        checked = parse_path(path)
        try:
            head = await self._call(
                self.client.head_object, Bucket=self.bucket, Key=self._key(checked)
            )
        except ClientError as exc:
            if _is_missing(exc):
                raise StoredFileNotFound() from None
            raise
        return FileInfo(
            path=str(checked),
            area=checked.area,
            name=checked.name,
            size=int(head["ContentLength"]),
            modified_at=head["LastModified"],
        )

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except StoredFileNotFound:
            return False
        return True

    async def delete(self, path: str) -> None:
        checked = parse_path(path)
        # S3 deletes are silent about missing keys; the API promises a 404.
        await self.stat(path)
        await self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(checked))

    def _scan(self, base: str) -> list[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        found: list[dict[str, Any]] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            found.extend(dict(obj) for obj in page.get("Contents", []))
        return found

    async def list(
        self, area: str, prefix: str = "", *, limit: int = 50, offset: int = 0
    ) -> tuple[list[FileInfo], int]:
        checked_area, prefix = parse_prefix(area, prefix)
        area_base = self._key(StoragePath(area=checked_area, key=""))
        objects = await anyio.to_thread.run_sync(self._scan, area_base + prefix)
        infos: list[FileInfo] = []
        for obj in objects:
            try:
                checked = parse_path(self._strip(obj["Key"]))
            except InvalidPath:
                continue  # written by something else, under a name we would refuse
            infos.append(
                FileInfo(
                    path=str(checked),
                    area=checked.area,
                    name=checked.name,
                    size=int(obj["Size"]),
                    modified_at=obj["LastModified"],
                )
            )
        infos.sort(key=lambda info: info.path)
        return infos[offset : offset + limit], len(infos)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self.client.close)
