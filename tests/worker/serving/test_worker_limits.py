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
