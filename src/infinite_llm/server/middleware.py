"""Checks every HTTP request passes before a route sees it, as plain ASGI middleware
(no response buffering, so streams and disconnects reach the routes untouched):
503 while draining, 401 without the API key, 413 for a body over the limit, 408 for a
body that does not arrive in time."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infinite_llm.server.errors import error_body

# Paths that a key protects; /health and /metrics stay open, as in vLLM, and so does the
# dashboard's page and its scripts (they hold no data; its feed is protected).
_PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/dashboard/feed")


async def send_error(send: Send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class Draining:
    """Once shutdown begins, new requests get 503; /health answers for itself."""

    def __init__(self, app: ASGIApp, is_draining: Callable[[], bool]) -> None:
        self.app = app
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        open_path = scope.get("path") in ("/health", "/metrics")
        if scope["type"] == "http" and self.is_draining() and not open_path:
            await send_error(send, 503, "the server is shutting down", "shutting_down")
            return
        await self.app(scope, receive, send)


class ApiKey:
    """``Authorization: Bearer <key>`` on the protected paths."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(_PROTECTED):
            given = _header(scope, b"authorization") or b""
            if not hmac.compare_digest(given, self.expected):
                message = "missing API key" if not given else "incorrect API key"
                await send_error(send, 401, message, "invalid_api_key")
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Bodies over ``max_bytes`` get a 413, whether announced by Content-Length or sent
    chunked; a body not received whole within ``read_timeout`` seconds gets a 408 (a
    slow client holds a connection, never the server). The body is read (and dropped) to
    its end first, so the client, still sending, reads the 413 rather than a reset
    connection."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.read_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body = message.get("body", b"")
                    size += len(body)
                    if size <= self.max_bytes:
                        chunks.append(body)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await send_error(send, 408, f"the request body did not arrive within "
                             f"{self.read_timeout:g} s", "request_timeout")
            return
        if size > self.max_bytes:
            await send_error(
                send, 413, f"the request body has {size} bytes, more than the limit of "
                f"{self.max_bytes}", "request_too_large",
            )
            return
        replay: list[Message] = [
            {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)
