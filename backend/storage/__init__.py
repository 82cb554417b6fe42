"""File storage for tapes (`inputs`) and reports (`outputs`): local folder or S3."""

from __future__ import annotations

from backend.config import Settings
from backend.storage.base import FileInfo, Storage, parse_path

__all__ = ["FileInfo", "Storage", "create_storage", "parse_path"]


def create_storage(settings: Settings) -> Storage:
    """The backend STORAGE_TYPE selects, configured from `settings`."""
    if settings.STORAGE_TYPE == "s3":
        from backend.storage.s3 import S3Storage

        return S3Storage(
            settings.S3_BUCKET,
            prefix=settings.S3_PREFIX,
            region=settings.S3_REGION,
            endpoint_url=settings.S3_ENDPOINT_URL,
        )
    from backend.storage.local import LocalStorage

    return LocalStorage(settings.STORAGE_LOCAL_ROOT)
