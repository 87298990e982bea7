"""The entry router: least-outstanding choice, stage paths, readiness, errors passed through,
a client's hang-up passed on, and the workers' armour (body limit, header timeout, a
connection limit under the file limit)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest
import uvicorn
from diffcascade_operator.local.router import ReplicaPool, Router, connection_budget
from diffcascade_worker.serving.api_keys import ApiKeys
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def test_pool_picks_the_replica_with_fewest_outstanding_requests() -> None:
    pool = ReplicaPool()
    for url in ("http://a", "http://b", "http://c"):
        pool.add(url)
    first = pool.pick()
    assert first is not None
    first.outstanding += 2
    second = pool.pick()
    assert second is not None and second.url != first.url
    second.outstanding += 1
    third = pool.pick()
    assert third is not None and third.url not in {first.url, second.url}
    pool.remove(third.url)
    assert pool.pick() is second  # 1 outstanding beats 2
    assert pool.pick(exclude=[second.url]) is first


class Upstream:
    """A stand-in worker that answers with its name (or a fixed status)."""

    def __init__(self, name: str, status: int = 200) -> None:
        self.name = name
        self.status = status
        self.calls = 0
        self.url = ""

        async def generate(request: Request) -> Response:
            self.calls += 1
            body = await request.json()
            headers = {"Retry-After": "2"} if self.status == 429 else None
            answer = {"who": self.name, "prompt": body["prompt"]}
            return JSONResponse(answer, status_code=self.status, headers=headers)

        self.app = Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        for _ in range(1000):
            if server.started:
                break
            await asyncio.sleep(0.01)
        try:
            yield self.url
        finally:
            server.should_exit = True
            await task


@pytest.fixture
async def router() -> AsyncIterator[Router]:
    router = Router(variants=["light", "heavy"], plan=lambda: {"cascade": "t", "threshold": 0.1})
    await router.start()
    try:
        yield router
    finally:
        await router.stop()


async def test_router_serves_the_first_stage_and_named_stages(router: Router) -> None:
    light, heavy = Upstream("light-1"), Upstream("heavy-1")
    async with light.serve(), heavy.serve(), httpx.AsyncClient(base_url=router.url) as client:
        assert (await client.get("/readyz")).status_code == 503
        router.pools["light"].add(light.url)
        assert (await client.get("/readyz")).status_code == 200

        entry = await client.post("/v1/images/generations", json={"prompt": "a cat"})
        assert entry.json() == {"who": "light-1", "prompt": "a cat"}

        missing = await client.post("/stages/heavy/v1/images/generations", json={"prompt": "x"})
        assert missing.status_code == 503 and missing.headers["Retry-After"] == "1"
        assert missing.json()["error"]["code"] == "no_replica"

        router.pools["heavy"].add(heavy.url)
        assert router.stage_url("heavy") == f"{router.url}/stages/heavy"
        deferred = await client.post("/stages/heavy/v1/images/generations", json={"prompt": "y"})
        assert deferred.json()["who"] == "heavy-1"

        unknown = await client.post("/stages/nope/v1/images/generations", json={"prompt": "z"})
        assert unknown.status_code == 404
        assert (await client.get("/v1/cascade/plan")).json()["threshold"] == 0.1


async def test_router_passes_overload_through_and_retries_a_dead_replica(router: Router) -> None:
    busy = Upstream("busy", status=429)
    async with busy.serve(), httpx.AsyncClient(base_url=router.url) as client:
        router.pools["light"].add(busy.url)
        refused = await client.post("/v1/images/generations", json={"prompt": "a"})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "2"

    alive = Upstream("alive")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with alive.serve(), httpx.AsyncClient(base_url=router.url) as client:
        router.pools["light"].remove(busy.url)
        router.pools["light"].add(dead)
        router.pools["light"].add(alive.url)
        answers = [
            await client.post("/v1/images/generations", json={"prompt": str(i)}) for i in range(4)
        ]
        assert all(a.status_code == 200 and a.json()["who"] == "alive" for a in answers)
        assert alive.calls == 4


class SlowUpstream:
    """A stand-in worker that answers after `delay_s` and notes a client that went away first
    (as the worker drops a request whose client hung up)."""

    def __init__(self, delay_s: float, *, stream: bool = False) -> None:
        self.delay_s = delay_s
        self.stream = stream
        self.gone = 0
        self.answered = 0

        async def generate(request: Request) -> Response:
            await request.body()

            async def client_gone() -> None:
                while (await request.receive())["type"] != "http.disconnect":
                    pass

            watch = asyncio.ensure_future(client_gone())
            done, _ = await asyncio.wait({watch}, timeout=self.delay_s)
            if watch in done:
                self.gone += 1
                return Response(status_code=499)
            watch.cancel()
            self.answered += 1
            if self.stream:

                async def events() -> AsyncIterator[bytes]:
                    yield b'event: image_generation.completed\ndata: {"b64_json": "x"}\n\n'

                return StreamingResponse(events(), media_type="text/event-stream")
            return JSONResponse({"data": [{"b64_json": "x"}]})

        self.app = Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])

    serve = Upstream.serve


async def _send_and_hang_up(url: str, body: bytes, *, after_s: float) -> None:
    host, port = url.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await asyncio.sleep(after_s)
    writer.close()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_client_that_hangs_up_is_passed_on_to_the_stage(
    router: Router, stream: bool
) -> None:
    """The worker drops the work of a client that went away; through the router it must see
    the hang-up too, or it computes the images for nobody."""
    slow = SlowUpstream(delay_s=2.0, stream=stream)
    async with slow.serve():
        router.pools["light"].add(slow.url)
        body = json.dumps({"prompt": "a cat", "stream": stream}).encode()
        await _send_and_hang_up(router.url, body, after_s=0.3)
        for _ in range(60):
            if slow.gone or slow.answered:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
    assert (slow.gone, slow.answered) == (1, 0)
    assert router.pools["light"].outstanding(slow.url) == 0


async def test_the_router_refuses_a_body_over_the_limit_without_forwarding_it() -> None:
    router = Router(variants=["light"], plan=dict, max_body_bytes=64 * 1024)
    await router.start()
    upstream = Upstream("light-1")
    try:
        async with upstream.serve(), httpx.AsyncClient(base_url=router.url) as client:
            router.pools["light"].add(upstream.url)
            declared = await client.post(
                "/v1/images/generations", content=b'{"prompt": "' + b"x" * 2**20 + b'"}'
            )

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(64):
                    yield b"x" * 4096

            streamed = await client.post("/v1/images/generations", content=chunks())
            fine = await client.post("/v1/images/generations", json={"prompt": "a cat"})
    finally:
        await router.stop()
    for refused in (declared, streamed):
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"]["code"] == "payload_too_large"
    assert fine.status_code == 200
    assert upstream.calls == 1


async def test_the_router_reaps_connections_that_send_no_request() -> None:
    router = Router(variants=["light"], plan=dict, header_timeout_s=0.5)
    await router.start()
    try:
        silent = socket.create_connection(("127.0.0.1", int(router.url.rsplit(":", 1)[1])))
        silent.settimeout(5.0)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.to_thread(silent.recv, 1) == b""
        elapsed = time.monotonic() - started
        silent.close()
    finally:
        await router.stop()
    assert elapsed < 4.0


_FLOODED_ROUTER = """
import asyncio, resource, sys
from diffcascade_operator.local.router import Router
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
async def main():
    router = Router(variants=["light"], plan=dict, header_timeout_s=60.0)
    print(await router.start(), router.max_connections, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_the_router_answers_probes_past_its_file_limit_under_a_flood() -> None:
    """1,100 idle sockets against `up` at a 1,024 file limit timed /healthz out for 35 s:
    the router now holds at most a quarter of its file limit in client connections and makes
    room for new ones, so the kernel never refuses a probe."""
    process = subprocess.Popen(
        [sys.executable, "-c", _FLOODED_ROUTER], stdout=subprocess.PIPE, text=True
    )
    opened: list[socket.socket] = []
    try:
        assert process.stdout is not None
        url, budget = process.stdout.readline().split()
        port = int(url.rsplit(":", 1)[1])
        for _ in range(300):  # more than the router's file limit
            with contextlib.suppress(OSError):
                opened.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        time.sleep(0.5)
        statuses = []
        for _ in range(5):
            try:
                statuses.append(httpx.get(url + "/healthz", timeout=3.0).status_code)
            except httpx.HTTPError as error:
                statuses.append(type(error).__name__)
    finally:
        for sock in opened:
            sock.close()
        process.kill()
        process.wait(timeout=10)
    assert int(budget) == connection_budget(256) == 64
    assert statuses == [200] * 5


def _outward_address() -> str | None:
    """An address of this machine that is not loopback (None when it has none)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


async def test_with_api_keys_the_entry_needs_one_and_stage_paths_answer_this_machine_only(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-team\n")
    router = Router(variants=["light", "heavy"], plan=dict, api_keys=ApiKeys(keys))
    await router.start(host="0.0.0.0")
    port = int(router.url.rsplit(":", 1)[1])
    light, heavy = Upstream("light-1"), Upstream("heavy-1")
    try:
        async with light.serve(), heavy.serve():
            router.pools["light"].add(light.url)
            router.pools["heavy"].add(heavy.url)
            local = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=local) as client:
                missing = await client.post("/v1/images/generations", json={"prompt": "a"})
                wrong = await client.get("/v1/models", headers={"Authorization": "Bearer sk-x"})
                good = {"Authorization": "Bearer sk-team"}
                served = await client.post(
                    "/v1/images/generations", json={"prompt": "a"}, headers=good
                )
                models = await client.get("/v1/models", headers=good)
                health = await client.get("/healthz")
                deferred = await client.post(
                    "/stages/heavy/v1/images/generations", json={"prompt": "d"}
                )
            outward = _outward_address()
            if outward is not None:
                async with httpx.AsyncClient(base_url=f"http://{outward}:{port}") as client:
                    around = await client.post(
                        "/stages/heavy/v1/images/generations", json={"prompt": "d"}
                    )
                assert around.status_code == 403, around.text
    finally:
        await router.stop()
    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert served.json()["who"] == "light-1" and models.status_code == 200
    assert health.status_code == 200
    assert deferred.json()["who"] == "heavy-1"  # a worker's deferral, from this machine
    assert heavy.calls == 1
