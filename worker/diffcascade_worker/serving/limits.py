"""Bounds on what one client can make a server hold: body bytes, connections, unread output.

uvicorn alone reads a request body of any size into memory, keeps a connection that never
sends a request open forever, keeps one whose client never reads its response open forever
too (the response waits in flow control, or in a transport that closes only once flushed),
and accepts connections until the file limit, after which even the kubelet's probes fail.
`BodyLimit` answers 413 before the body is read (or as soon as a chunked body passes the
limit); `guarded_protocol` closes connections that do not send their request headers in time,
aborts those whose pending output makes no progress for the write timeout, caps pipelined
requests, and over the connection limit makes room for a new connection (a probe): first a
stalled writer, then an idle connection (one that never sent a request before one in use).
The worker and the `up` router both run behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import resource
import socket
import struct
import termios
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
#: A connection whose unsent output does not shrink for this long is aborted: its client
#: stopped reading (a slow client that reads keeps it alive).
DEFAULT_WRITE_TIMEOUT_S = 10.0
#: Requests a client may queue behind the one being answered on one connection (HTTP
#: pipelining): each queued request holds memory, and no common client pipelines at all.
MAX_PIPELINED_REQUESTS = 16
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
    base: type[asyncio.Protocol],
    *,
    header_timeout_s: float,
    max_connections: int,
    write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
) -> type[asyncio.Protocol]:
    """`base` (uvicorn's HTTP protocol class) with a header timeout, a write timeout, a cap on
    pipelined requests and a connection limit."""

    class GuardedProtocol(base):  # type: ignore[valid-type,misc]
        _header_timer: asyncio.TimerHandle | None = None
        _header_mark: Any = None
        _idle_since = 0.0  # when the connection last finished an answer (or opened)
        _answered = 0  # answers completed on this connection
        _write_timer: asyncio.TimerHandle | None = None
        _write_mark: tuple[Any, int] = (None, 0)  # (request, unsent bytes) when armed

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._idle_since = time.monotonic()
            self._arm_header_timer()
            if len(self.connections) > max_connections:
                self._make_room()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if len(getattr(self, "pipeline", ())) > MAX_PIPELINED_REQUESTS:
                self.drop()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = time.monotonic()
            self._answered += 1
            self._arm_header_timer()
            self._arm_write_timer()  # a response handed over is not yet a response sent

        def pause_writing(self) -> None:
            super().pause_writing()
            self._arm_write_timer()

        def resume_writing(self) -> None:
            super().resume_writing()
            self._cancel_write_timer()  # the client read: measure afresh from here
            self._arm_write_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self._cancel_write_timer()
            super().connection_lost(exc)

        def idle(self) -> bool:
            cycle = self.cycle
            return cycle is None or bool(cycle.response_complete)

        def unsent(self) -> int:
            """Bytes the transport holds because the kernel's send buffer is full."""
            transport = self.transport
            return 0 if transport is None else int(transport.get_write_buffer_size())

        def untaken(self) -> int:
            """Bytes written that the client has not taken yet, in the transport and the
            kernel: the kernel's part shrinks as soon as the client reads, the transport's
            only once half the kernel buffer is free, too late to tell a slow reader."""
            return self.unsent() + _kernel_unsent(self.transport)

        def stalled(self) -> bool:
            """Output waits on a client that does not read: flow control paused the response,
            or the transport closes only once flushed."""
            transport = self.transport
            if transport is None or self.unsent() == 0:
                return False
            return bool(self.flow.write_paused) or bool(transport.is_closing())

        def drop(self) -> None:
            """Drop the connection and whatever output it still holds."""
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's next send is a no-op, not an error
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                # A reset, not a close: the kernel would otherwise keep the unread bytes
                # (megabytes) queued for a client that will not take them.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

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
                self._close_or_drop()

        def _arm_write_timer(self) -> None:
            if self._write_timer is None and self.unsent() > 0:
                self._write_mark = (self.cycle, self.untaken())
                self._write_timer = self.loop.call_later(write_timeout_s, self._write_timeout)

        def _cancel_write_timer(self) -> None:
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_timeout(self) -> None:
            self._write_timer = None
            request, untaken = self._write_mark
            if self.unsent() == 0:
                return  # the kernel holds the rest; the next response arms the timer again
            if self.cycle is request and self.untaken() >= untaken:
                self.drop()  # not one byte taken in write_timeout_s
                return
            self._arm_write_timer()  # progress: the client reads, or sent another request

        def _close_or_drop(self) -> None:
            if self.unsent():
                self.drop()  # close() would wait for a flush that may never come
            else:
                self.transport.close()

        def _make_room(self) -> None:
            others = [c for c in self.connections if c is not self]
            stalled = [c for c in others if _is_stalled(c)]
            if stalled:
                min(stalled, key=_eviction_order).drop()
                return
            idle = [c for c in others if _is_idle(c)]
            if idle:
                min(idle, key=_eviction_order)._close_or_drop()
                return
            self.transport.close()  # every other connection is working: refuse this one

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def _kernel_unsent(transport: Any) -> int:
    """Bytes in a socket's kernel send queue (Linux SIOCOUTQ); 0 where that cannot be read."""
    sock = None if transport is None else transport.get_extra_info("socket")
    try:
        if sock is None or sock.fileno() < 0:
            return 0
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError, AttributeError):
        return 0
    return int(struct.unpack("i", queued)[0])


def _eviction_order(connection: Any) -> tuple[bool, float]:
    """Connections that never sent a request first (a flood's sockets), then the longest idle:
    a client that keeps using its connection is the last to lose it."""
    used = bool(getattr(connection, "_answered", 0))
    return used, float(getattr(connection, "_idle_since", 0.0))


def _is_stalled(connection: Any) -> bool:
    stalled = getattr(connection, "stalled", None)
    return bool(stalled()) if callable(stalled) else False


def _is_idle(connection: Any) -> bool:
    idle = getattr(connection, "idle", None)
    transport = getattr(connection, "transport", None)
    if transport is None or transport.is_closing():
        return False  # already on its way out (a stalled one is caught by `_is_stalled`)
    return bool(idle()) if callable(idle) else False


def raise_file_limit() -> int:
    """Soft file limit up to the hard one, so the connection limit, not the kernel, refuses;
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
