"""/api/files: upload (analyst, admin), list and download (signed in), delete (admin).

Non-admins read only their own scopes (backend/scoping.py), applied by the service.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

import structlog
from fastapi import APIRouter, Query, Request, status
from fastapi.responses import Response, StreamingResponse

from backend.api.dependencies import (
    AdminUser,
    AnalystUser,
    CurrentUser,
    SettingsDep,
    StorageDep,
)
from backend.files import service
from backend.files.multipart import FileFieldStream
from backend.files.schemas import FileRead, UploadResult
from backend.pagination import Page, PageDep
from backend.storage.base import MAX_PATH_LENGTH, Area

logger = structlog.get_logger(__name__)
router = APIRouter(prefix="/api/files", tags=["files"])

PathQuery = Annotated[
    str, Query(min_length=1, max_length=MAX_PATH_LENGTH, description="`<area>/<key>`")
]


# The body is parsed by hand (see files/multipart.py), so describe it for the docs.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A CSV tape (.csv or .csv.gz)",
                        }
                    },
                }
            }
        },
    }
}


@router.post(
    "/upload",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadResult,
    openapi_extra=UPLOAD_BODY,
    responses={
        400: {"description": "Empty file, malformed multipart body or unusable file name"},
        409: {"description": "A file with this name exists (and overwrite is false)"},
        413: {"description": "The file is larger than MAX_UPLOAD_SIZE_MB"},
        415: {"description": "Not a multipart body, or the file is not a CSV tape"},
    },
)
async def upload_file(
    request: Request,
    user: AnalystUser,
    storage: StorageDep,
    settings: SettingsDep,
    overwrite: bool = False,
) -> UploadResult:
    # Dependencies (auth included) run before a byte of the body is read.
    body = FileFieldStream(request, "file")
    filename = await body.start()
    path, size, sha256 = await service.store_upload(
        storage,
        user,
        filename,
        body.chunks(),
        overwrite=overwrite,
        max_upload_mb=settings.MAX_UPLOAD_SIZE_MB,
    )
    return UploadResult(path=path, name=path.rsplit("/", 1)[-1], size=size, sha256=sha256)


@router.get(
    "",
    response_model=Page[FileRead],
    responses={400: {"description": "The prefix is not a valid storage path"}},
)
async def list_files(
    user: CurrentUser,
    storage: StorageDep,
    page: PageDep,
    area: Area = "inputs",
    prefix: Annotated[str, Query(max_length=512)] = "",
) -> Page[FileRead]:
    infos, total = await service.list_readable(storage, user, area, prefix, page)
    return Page(
        items=[FileRead.model_validate(info, from_attributes=True) for info in infos],
        total=total,
        limit=page.limit,
        offset=page.offset,
    )


@router.get(
    "/download",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes, streamed (never compressed in transit)",
            "content": {
                media: {"schema": {"type": "string", "format": "binary"}}
                for media in service.DOWNLOAD_MEDIA_TYPES
            },
        },
        400: {"description": "The path is not a valid storage path"},
        404: {"description": "No such file (or not one the caller may read)"},
    },
)
async def download_file(user: CurrentUser, storage: StorageDep, path: PathQuery) -> Response:
    # stat first: a missing file must be a 404, not a broken 200 stream.
    info = await service.stat_readable(storage, user, path)
    return StreamingResponse(
        storage.open(info.path),
        media_type=service.media_type(info.name),
        headers={
            "Content-Length": str(info.size),
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(info.name)}",
        },
    )


@router.delete(
    "",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        400: {"description": "The path is not a valid storage path"},
        404: {"description": "No such file"},
    },
)
async def delete_file(_admin: AdminUser, storage: StorageDep, path: PathQuery) -> Response:
    await storage.delete(path)
    logger.info("file.deleted", path=path)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
