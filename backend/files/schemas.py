"""Bodies of the files endpoints."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from backend.storage.base import Area


class FileRead(BaseModel):
    """A stored file; `path` is what the download, delete and pipeline endpoints take."""

    path: str
    area: Area
    name: str
    size: int
    modified_at: datetime


class UploadResult(BaseModel):
    path: str
    name: str
    size: int
    sha256: str
