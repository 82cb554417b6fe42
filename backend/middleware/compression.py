"""GZip for responses worth compressing, except on routes that must stream bytes as stored.

Pure ASGI: a request on an excluded path goes straight to the app; every other
request goes through Starlette's GZipMiddleware.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

# Small bodies gain little and cost CPU; 1 KB is about where gzip starts paying off.
MINIMUM_SIZE = 1000


class CompressionMiddleware:
    """Gzip a response when the client accepts gzip and the body is `minimum_size` or more.

    Contract:
    - requests whose path is in `exclude_paths` are never compressed: file
      downloads are streamed as stored, with their Content-Length, so a client
      (or a resumable download) gets exactly the file's bytes;
    - everything else follows GZipMiddleware: `Content-Encoding: gzip` and
      `Vary: Accept-Encoding` when compressed, bodies under `minimum_size` and
      already-encoded or binary media types (gzip, images, ...) left alone.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        exclude_paths: Iterable[str] = (),
        minimum_size: int = MINIMUM_SIZE,
    ) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=minimum_size)
        self.exclude_paths = frozenset(exclude_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exclude_paths:
            await self.app(scope, receive, send)
            return
        await self.gzip(scope, receive, send)
