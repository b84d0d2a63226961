"""The ASGI layer in front of every route: refuses new requests while the server drains (503), checks the Bearer
key on every path but the public ones (401), refuses a declared body over the limit (413), and turns any exception a route lets
escape into OpenAI's error shape (500, logged) instead of a traceback. Pure ASGI, so streamed responses and client
disconnects pass through untouched."""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from qtool.serve.api_errors import ApiError, error_body

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class ServerState:
    """What the guard and the routes share: whether the server drains, how many requests are in flight, and which
    paths need no API key (exact paths, and prefixes: routes added beside the API, such as a page and its static
    files, add theirs; everything else needs the key when one is set)."""

    draining: bool = False
    in_flight: int = 0
    public_paths: set[str] = field(default_factory=lambda: {"/health"})
    public_prefixes: list[str] = field(default_factory=list)

    def is_public(self, path: str) -> bool:
        return path in self.public_paths or any(path.startswith(prefix) for prefix in self.public_prefixes)


async def send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def bearer_ok(headers: dict[bytes, bytes], api_key: str) -> bool:
    value = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = value.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Guard:
    def __init__(self, app: Callable, state: ServerState, api_key: str | None, max_body_bytes: int,
                 count: Callable[[str, int], None] = lambda path, status: None):
        self.app, self.state, self.api_key, self.max_body_bytes = app, state, api_key, max_body_bytes
        self.count = count  # (path, status) of each request the guard answers itself

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        if self.state.draining and path != "/health":
            await self._refuse(send, path, 503, error_body(503, "the server is shutting down: no new requests",
                                                           code="draining"), [(b"connection", b"close")])
            return
        if self.api_key and not self.state.is_public(path) and not bearer_ok(headers, self.api_key):
            await self._refuse(send, path, 401, error_body(401, "missing or wrong API key: send 'Authorization: "
                                                           "Bearer KEY'", code="invalid_api_key"),
                               [(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            await self._refuse(send, path, 400, error_body(400, "the Content-Length header is not a number",
                                                           code="invalid_content_length"))
            return
        if length is not None and int(length) > self.max_body_bytes:
            await self._refuse(send, path, 413, error_body(413, f"the request body is {length.decode('latin-1')} "
                                                           f"bytes, the limit is {self.max_body_bytes}",
                                                           code="body_too_large"))
            return
        started = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.state.in_flight += 1
        try:
            await self.app(scope, receive, tracked_send)
        except ApiError as exc:  # raised outside a route's own handling (e.g. while streaming starts)
            if not started:
                await send_json(send, exc.status, exc.body())
        except Exception:
            logger.exception("request %s %s failed", scope.get("method"), path)
            if not started:
                await self._refuse(send, path, 500, error_body(500, "internal server error (logged on the server)",
                                                               code="internal_error"))
        finally:
            self.state.in_flight -= 1

    async def _refuse(self, send: Send, path: str, status: int, body: dict[str, Any],
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
        self.count(path, status)
        await send_json(send, status, body, headers)
