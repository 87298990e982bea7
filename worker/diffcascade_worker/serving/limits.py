"""Bounds on what one client can make a worker hold: body bytes and connections.

uvicorn alone reads a request body of any size into memory, keeps a connection that never
sends a request open forever and accepts connections until the file limit, after which even
the kubelet's probes fail. `BodyLimit` answers 413 before the body is read (or as soon as a
chunked body passes the limit); `guarded_protocol` closes connections that do not send their
request headers in time and, over the connection limit, evicts the longest-idle connection
so that a new one (a probe) is still served.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffcascade_worker.serving.errors import PayloadTooLarge

#: A prompt is at most 4,000 characters; even fully \\u-escaped JSON stays far below this.
DEFAULT_MAX_BODY_BYTES = 256 * 1024
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5
#: A refused body is read and discarded up to this much, so that a client (or a proxy in
#: front) that is still sending gets to read the 413; beyond it the connection is just closed.
DISCARD_BYTES = 128 * 1024 * 1024


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body over the limit of {limit} bytes")


class _BodyOverLimit(HTTPException):
    """Raised from `receive` once a chunked body passes the limit; the app answers 413."""


class BodyLimit:
    """ASGI middleware: 413 for a declared or streamed body over `max_bytes`."""

    def __init__(self, app: ASGIApp, *, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            if declared <= DISCARD_BYTES:
                await _discard(receive)
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyOverLimit(413, _too_large(self.max_bytes).message)
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, send: Send) -> None:
        error = _too_large(self.max_bytes)
        body = json.dumps(error.envelope().model_dump()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),  # the unread body must not become a request
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def _discard(receive: Receive) -> None:
    read = 0
    while read <= DISCARD_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def guarded_protocol(
    base: type[asyncio.Protocol], *, header_timeout_s: float, max_connections: int
) -> type[asyncio.Protocol]:
    """`base` (uvicorn's HTTP protocol class) with a header timeout and a connection limit."""

    class GuardedProtocol(base):  # type: ignore[valid-type,misc]
        _header_timer: asyncio.TimerHandle | None = None
        _header_mark: Any = None
        _opened_at = 0.0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._opened_at = time.monotonic()
            self._arm_header_timer()
            if len(self.connections) > max_connections:
                self._make_room()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def idle(self) -> bool:
            cycle = self.cycle
            return cycle is None or bool(cycle.response_complete)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_mark = self.cycle
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            # No request header block completed since the timer was armed: close.
            self._header_timer = None
            waiting = self.cycle is self._header_mark and self.idle()
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def _make_room(self) -> None:
            idle = [c for c in self.connections if c is not self and _is_idle(c)]
            victim = min(idle, key=lambda c: getattr(c, "_opened_at", 0.0), default=self)
            victim.transport.close()

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def _is_idle(connection: Any) -> bool:
    idle = getattr(connection, "idle", None)
    transport = getattr(connection, "transport", None)
    if transport is None or transport.is_closing():
        return False  # already on its way out: closing it again frees nothing
    return bool(idle()) if callable(idle) else False
