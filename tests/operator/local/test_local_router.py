"""The entry router: least-outstanding choice, stage paths, readiness, errors passed through."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from diffcascade_operator.local.router import ReplicaPool, Router
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
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
