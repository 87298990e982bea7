"""What one client can make a worker hold: body size, idle connections, a connection flood.

The worker runs in-process behind the same server stack as `diffcascade-worker serve`
(`serve_command.server_config`: uvicorn, the body limit, the connection guards).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from diffcascade_worker.protocol import PATH_GENERATIONS, PATH_HEALTHZ
from diffcascade_worker.serving.limits import MAX_PIPELINED_REQUESTS
from diffcascade_worker.serving.service import WorkerService
from diffcascade_worker.serving.settings import WorkerSettings
from worker_testing import FakeEngine, fake_loader, served_in_process


def _service(**overrides: Any) -> WorkerService:
    values: dict[str, Any] = {
        "model": "fake",
        "variant": "light",
        "size": 64,
        "token": "t",
        "slo_seconds": 30,
        **overrides,
    }
    return WorkerService(WorkerSettings(**values), engine_loader=fake_loader(FakeEngine()))


@contextlib.asynccontextmanager
async def _worker(**overrides: Any) -> AsyncIterator[str]:
    async with served_in_process(_service(**overrides)) as url:
        yield url


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _closed_by_peer(sock: socket.socket, *, within_s: float) -> bool:
    """True when the server closes `sock` (recv returns EOF) within `within_s`."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def test_body_over_the_limit_is_413_in_the_openai_envelope() -> None:
    async with _worker(max_body_bytes=64 * 1024) as url, httpx.AsyncClient() as client:
        padding = "x" * (2 * 1024 * 1024)
        declared = await client.post(
            url + PATH_GENERATIONS,
            content=f'{{"prompt": "{padding}"}}',
            headers={"content-type": "application/json"},
        )

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked
            yield b'{"prompt": "'
            for _ in range(64):
                yield b"x" * 16384
            yield b'"}'

        streamed = await client.post(
            url + PATH_GENERATIONS, content=chunks(), headers={"content-type": "application/json"}
        )
        fine = await client.post(url + PATH_GENERATIONS, json={"prompt": "a cat", "seed": 1})
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"]["code"] == "payload_too_large"
    assert streamed.status_code == 413, streamed.text
    assert streamed.json()["error"]["type"] == "invalid_request_error"
    assert fine.status_code == 200


async def test_connection_that_sends_no_request_is_closed_after_the_header_timeout() -> None:
    async with _worker(header_timeout_s=0.5) as url:
        silent = socket.create_connection(("127.0.0.1", _port(url)))
        slow = socket.create_connection(("127.0.0.1", _port(url)))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        started = time.monotonic()
        closed = await asyncio.gather(
            asyncio.to_thread(_closed_by_peer, silent, within_s=5.0),
            asyncio.to_thread(_closed_by_peer, slow, within_s=5.0),
        )
        elapsed = time.monotonic() - started
        silent.close()
        slow.close()
    assert list(closed) == [True, True]
    assert elapsed < 4.0


async def test_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with _worker(keep_alive_s=1) as url:
        sock = socket.create_connection(("127.0.0.1", _port(url)))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5.0)
        assert (await asyncio.to_thread(sock.recv, 65536)).startswith(b"HTTP/1.1 200")
        closed = await asyncio.to_thread(_closed_by_peer, sock, within_s=4.0)
        sock.close()
    assert closed


@contextlib.contextmanager
def _idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(socket.create_connection(("127.0.0.1", port)))
        yield opened
    finally:
        for sock in opened:
            sock.close()


@pytest.mark.parametrize("flood", [1000])
async def test_probes_answer_under_a_flood_of_idle_connections(flood: int) -> None:
    async with _worker(max_connections=64, header_timeout_s=30.0) as url:
        with _idle_connections(_port(url), flood) as idle:
            await asyncio.sleep(0.5)  # let the server accept them all
            statuses = []
            for _ in range(20):  # a new connection each time, as the kubelet's probes do
                async with httpx.AsyncClient(timeout=5.0) as client:
                    statuses.append((await client.get(url + PATH_HEALTHZ)).status_code)
            closed = sum(
                await asyncio.gather(
                    *(asyncio.to_thread(_closed_by_peer, s, within_s=0.01) for s in idle)
                )
            )
    assert statuses == [200] * 20
    assert closed >= flood - 64  # the longest-idle connections made room


class _BigImages(FakeEngine):
    """A fake engine whose every encoded image is `size` bytes: big responses, no model."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def encode(self, image: Any) -> str:
        return "A" * self.size


_MB = 1024 * 1024


def _big_worker(**overrides: Any) -> contextlib.AbstractAsyncContextManager[str]:
    service = WorkerService(
        WorkerSettings(model="fake", variant="light", size=64, token="t", **overrides),
        engine_loader=fake_loader(_BigImages(_MB)),
    )
    return served_in_process(service)


def _request_and_never_read(port: int, *, n: int, window: int = 4096) -> socket.socket:
    """A client that asks for n one-MB images and never reads the answer (with a receive
    buffer of `window` bytes, so that the server's side fills up)."""
    body = f'{{"prompt": "p", "n": {n}, "seed": 1}}'
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"POST {PATH_GENERATIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    return sock


def _read_all(
    sock: socket.socket, *, within_s: float, pause_s: float = 0.0, enough: int | None = None
) -> int:
    """Bytes received until the server closes (or `within_s` passes, or `enough` came);
    `pause_s` between reads makes a slow reader."""
    sock.settimeout(within_s)
    received = 0
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(256 * 1024)
            if not chunk:
                break
            received += len(chunk)
            if enough is not None and received >= enough:
                break
            if pause_s:
                time.sleep(pause_s)
    except (TimeoutError, ConnectionResetError):
        pass
    return received


async def test_probes_answer_while_clients_never_read_their_responses() -> None:
    """Each client is served 8 MB and never reads: its connection is neither idle nor gone
    (the response waits in the transport), so over the limit such a connection makes room."""
    async with _big_worker(max_connections=8, keep_alive_s=1, write_timeout_s=120.0) as url:
        held = [_request_and_never_read(_port(url), n=8) for _ in range(8)]
        try:
            await asyncio.sleep(2.5)  # answered, then closed by the keep-alive timeout
            statuses = []
            for _ in range(5):  # a new connection each time, as the kubelet's probes do
                async with httpx.AsyncClient(timeout=5.0) as client:
                    statuses.append((await client.get(url + PATH_HEALTHZ)).status_code)
        finally:
            for sock in held:
                sock.close()
    assert statuses == [200] * 5


async def test_a_response_nobody_reads_is_dropped_after_the_write_timeout() -> None:
    async with _big_worker(write_timeout_s=1.0, keep_alive_s=30) as url:
        stalled = _request_and_never_read(_port(url), n=8)
        await asyncio.sleep(3.0)
        got = await asyncio.to_thread(_read_all, stalled, within_s=5.0)
        stalled.close()
    assert got < 6 * _MB, f"the whole 8 MB answer waited {got} bytes for a client that never read"


async def test_a_slow_reader_is_not_taken_for_a_stalled_one() -> None:
    """It reads about 1 MB/s: the server's buffers stay full for seconds, yet shrink."""
    async with _big_worker(write_timeout_s=0.5) as url:
        slow = _request_and_never_read(_port(url), n=6, window=64 * 1024)
        got = await asyncio.to_thread(
            _read_all, slow, within_s=20.0, pause_s=0.1, enough=6 * _MB + 1
        )
        slow.close()
    assert got > 6 * _MB  # every image (6 MB of base64 JSON) arrived


async def test_a_connection_pipelining_past_the_cap_is_dropped() -> None:
    asked = MAX_PIPELINED_REQUESTS + 8

    def answers(sock: socket.socket) -> int:
        sock.settimeout(5.0)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        return data.count(b"HTTP/1.1 200")

    async with _worker(keep_alive_s=1) as url:
        sock = socket.create_connection(("127.0.0.1", _port(url)))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * asked)
        answered = await asyncio.to_thread(answers, sock)
        sock.close()
        async with httpx.AsyncClient() as client:
            after = await client.get(url + PATH_HEALTHZ)
    assert answered < asked  # dropped, not served to the end
    assert after.status_code == 200


async def test_a_flood_evicts_its_own_sockets_before_a_client_in_use() -> None:
    """Over the limit, a connection that never sent a request goes first: a client that opened
    its connection long before a flood of idle sockets and keeps using it is not cut off."""

    def ask(sock: socket.socket) -> bytes:
        """One GET /healthz on `sock`: the status line of its answer (b"" if closed)."""
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        with contextlib.suppress(ConnectionError):
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if not head:
                return b"closed"
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length and (chunk := sock.recv(65536)):
                body += chunk
        return data.split(b"\r\n", 1)[0]

    async with _worker(max_connections=16, header_timeout_s=30.0) as url:
        client = socket.create_connection(("127.0.0.1", _port(url)))
        client.settimeout(5.0)
        answers = [await asyncio.to_thread(ask, client)]
        with _idle_connections(_port(url), 8):
            await asyncio.sleep(0.2)
            answers.append(await asyncio.to_thread(ask, client))  # the flood idles longer
            with _idle_connections(_port(url), 200):
                await asyncio.sleep(0.5)
                answers.append(await asyncio.to_thread(ask, client))
        client.close()
    assert answers == [b"HTTP/1.1 200 OK"] * 3
