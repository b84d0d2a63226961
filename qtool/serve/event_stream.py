"""Server-sent events: one `data: ...` event, and the streamed response that sends an async iterator's chunks as its
own ASGI call (no buffering, no background listener: the iterator watches for the client's disconnect itself)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from starlette.responses import Response


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


class EventStream(Response):
    """A text/event-stream response of the chunks an async iterator yields. The iterator is always closed at the
    end, so its own clean-up (aborting an unfinished request) runs also when a send fails or the task is cancelled."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes]):
        self.chunks = chunks
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away mid-send (ASGI 2.4 servers raise it): stop generating for it
            pass
        finally:
            await self.chunks.aclose()
