"""A plain ASGI app for uvicorn: a small JSON endpoint and a 10 MiB streamed body.

``GET /json`` returns a 60-byte JSON object. ``GET /bulk`` streams 10 MiB in 64 KiB chunks
with ``Content-Length`` set, as a file download from a dev server would.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BULK_BYTES = 10 * 1024 * 1024
CHUNK_BYTES = 64 * 1024

_JSON_BODY = json.dumps({"ok": True, "service": "bench", "items": [1, 2, 3]}).encode()
_CHUNK = b"x" * CHUNK_BYTES


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Serve ``/json``, ``/bulk`` and 404 for anything else."""
    if scope["type"] != "http":
        return

    if scope["path"] == "/json":
        await _send_head(send, 200, b"application/json", len(_JSON_BODY))
        await send({"type": "http.response.body", "body": _JSON_BODY})
        return

    if scope["path"] == "/bulk":
        await _send_head(send, 200, b"application/octet-stream", BULK_BYTES)
        for _ in range(BULK_BYTES // CHUNK_BYTES - 1):
            await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": _CHUNK})
        return

    await _send_head(send, 404, b"text/plain", 10)
    await send({"type": "http.response.body", "body": b"not found\n"})


async def _send_head(send: Send, status: int, content_type: bytes, length: int) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(length).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
