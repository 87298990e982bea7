"""The router service over real HTTP in front of two workers (fake engines: 'hard...' prompts
get gate confidence 0.1, 'easy...' 0.9), all served in-process by the same server stack as
`diffcascade-worker route` and `serve`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from diffcascade_worker.protocol import (
    HEADER_ROUTED_TO,
    PATH_GENERATIONS,
    PATH_METRICS,
    PATH_READYZ,
    PATH_ROUTER_CONFIG,
    RouterConfig,
)
from diffcascade_worker.routing.route_command import router_server_config
from diffcascade_worker.routing.service import RouterService, RouterSettings
from diffcascade_worker.serving.service import WorkerService
from diffcascade_worker.serving.settings import WorkerSettings
from prometheus_client.parser import text_string_to_metric_families
from worker_testing import FakeEngine, fake_loader, served_in_process

TOKEN = "router-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _worker(variant: str, engine: FakeEngine, **overrides: Any) -> WorkerService:
    values: dict[str, Any] = {
        "model": "fake",
        "variant": variant,
        "cascade": "c",
        "size": 64,
        "token": "t",
        "slo_seconds": 30,
        **overrides,
    }
    return WorkerService(WorkerSettings(**values), engine_loader=fake_loader(engine))


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


@contextlib.asynccontextmanager
async def _router(service: RouterService) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(router_server_config(service, log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await _until(lambda: bool(server.started))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)
        sock.close()


@dataclass
class Stack:
    router: str
    light: str
    heavy: str
    service: RouterService
    light_engine: FakeEngine

    def config(self, **changes: Any) -> dict[str, Any]:
        base = {
            "entry_url": self.light,
            "entry_variant": "light",
            "heavy_url": self.heavy,
            "heavy_variant": "heavy",
            "router_share": 0.0,
            "exploration_share": 0.0,
        }
        return {**base, **changes}


@contextlib.asynccontextmanager
async def _stack(
    light_delay_s: float = 0.0, initial: bool = True, **settings: Any
) -> AsyncIterator[Stack]:
    light_engine = FakeEngine(delay_s=light_delay_s)
    heavy = _worker("heavy", FakeEngine(gate=False))
    async with served_in_process(heavy) as heavy_url:
        light = _worker(
            "light", light_engine, next_stage_url=heavy_url, threshold=0.5, batch_size=4
        )
        async with served_in_process(light) as light_url:
            config = RouterConfig(
                entry_url=light_url,
                entry_variant="light",
                heavy_url=heavy_url,
                heavy_variant="heavy",
                exploration_share=0.0,
            )
            service = RouterService(
                RouterSettings(
                    cascade="c",
                    token=TOKEN,
                    initial=config if initial else None,
                    allowed_stages=(light_url, heavy_url),
                    seed=0,
                    **settings,
                )
            )
            async with _router(service) as url:
                yield Stack(url, light_url, heavy_url, service, light_engine)


async def _post(client: httpx.AsyncClient, url: str, prompt: str, **extra: Any) -> httpx.Response:
    return await client.post(url + PATH_GENERATIONS, json={"prompt": prompt, **extra})


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and set(labels.items()) <= set(s.labels.items())
    )


async def test_share_zero_sends_everything_through_the_entry_and_learns_the_gate() -> None:
    async with _stack() as stack, httpx.AsyncClient(timeout=30) as client:
        for i in range(6):
            prompt = f"{'hard' if i % 2 else 'easy'} prompt {i}"
            response = await _post(client, stack.router, prompt, seed=i)
            assert response.status_code == 200, response.text
            assert response.headers[HEADER_ROUTED_TO] == "entry"
            image = response.json()["data"][0]
            # The stage's answer, unchanged: the gate deferred the hard prompts to heavy.
            assert image["served_by"] == ("heavy" if i % 2 else "light")
            assert image["deferred"] is bool(i % 2)
        text = (await client.get(stack.router + PATH_METRICS)).text
    assert _metric(text, "diffcascade_router_labels_total") == 6
    assert _metric(text, "diffcascade_router_routed_images_total", target="entry") == 6
    assert _metric(text, "diffcascade_router_routed_images_total", target="heavy") == 0


async def test_a_learned_router_sends_the_hard_prompts_straight_to_heavy() -> None:
    async with _stack() as stack, httpx.AsyncClient(timeout=30) as client:
        for i in range(60):  # r = 0: every prompt goes through the gate and yields a label
            kind = "hard" if i % 2 else "easy"
            response = await _post(client, stack.router, f"{kind} scene number {i}")
            assert response.status_code == 200
        put = await client.put(
            stack.router + PATH_ROUTER_CONFIG, json=stack.config(router_share=0.5), headers=AUTH
        )
        assert put.status_code == 200, put.text
        routed: dict[str, list[str]] = {}
        for i in range(60, 80):
            kind = "hard" if i % 2 else "easy"
            response = await _post(client, stack.router, f"{kind} scene number {i}")
            assert response.status_code == 200
            routed.setdefault(kind, []).append(response.headers[HEADER_ROUTED_TO])
            if response.headers[HEADER_ROUTED_TO] == "heavy":
                assert response.json()["data"][0]["served_by"] == "heavy"
        text = (await client.get(stack.router + PATH_METRICS)).text
    assert routed["hard"].count("heavy") >= 8  # of 10
    assert routed["easy"].count("heavy") <= 2
    assert _metric(text, "diffcascade_router_prequential_auc") > 0.9
    assert _metric(text, "diffcascade_router_share") == 0.5


async def test_a_plan_change_keeps_accepted_requests_on_their_old_target() -> None:
    async with _stack(light_delay_s=0.3) as stack, httpx.AsyncClient(timeout=30) as client:
        early = [
            asyncio.create_task(_post(client, stack.router, f"easy early {i}")) for i in range(4)
        ]
        await _until(lambda: stack.service.inflight >= 4)
        # Every prompt goes to heavy from now on (r = 1); the four accepted stay on light.
        put = await client.put(
            stack.router + PATH_ROUTER_CONFIG, json=stack.config(router_share=1.0), headers=AUTH
        )
        assert put.status_code == 200
        late = await _post(client, stack.router, "easy late")
        answers = await asyncio.gather(*early)
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.json()["data"][0]["served_by"] for a in answers} == {"light"}
    assert late.headers[HEADER_ROUTED_TO] == "heavy"
    assert late.json()["data"][0]["served_by"] == "heavy"


async def test_a_client_hang_up_cancels_the_upstream_request() -> None:
    async with _stack(light_delay_s=1.0) as stack:
        async with httpx.AsyncClient(timeout=30) as client:
            request = asyncio.create_task(_post(client, stack.router, "easy abandoned", n=4))
            await _until(lambda: stack.service.inflight >= 1)
            await asyncio.sleep(0.2)  # forwarded: the light worker holds it
            request.cancel()  # the client hangs up
            with contextlib.suppress(asyncio.CancelledError):
                await request
        await _until(lambda: stack.service.inflight == 0)
        async with httpx.AsyncClient(timeout=10) as client:
            light_metrics = (await client.get(stack.light + PATH_METRICS)).text
    abandoned = _metric(light_metrics, "diffcascade_completed_requests_total", outcome="abandoned")
    assert abandoned >= 1  # the light worker saw its client (the router) go away


async def test_streamed_answers_are_relayed_and_their_confidences_learned() -> None:
    async with _stack() as stack, httpx.AsyncClient(timeout=30) as client:
        async with client.stream(
            "POST",
            stack.router + PATH_GENERATIONS,
            json={"prompt": "hard streamed", "stream": True, "partial_images": 1},
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            body = (await response.aread()).decode()
        text = (await client.get(stack.router + PATH_METRICS)).text
    assert "image_generation.partial_image" in body  # the light image of the deferral
    assert "image_generation.completed" in body
    assert _metric(text, "diffcascade_router_labels_total") == 1


async def test_errors_map_to_openai_envelopes_and_status_codes() -> None:
    async with (
        _stack(initial=False, max_inflight=1) as stack,
        httpx.AsyncClient(timeout=30) as client,
    ):
        # No plan yet: not ready, 503.
        assert (await client.get(stack.router + PATH_READYZ)).status_code == 503
        refused = await _post(client, stack.router, "easy")
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        # The config API needs the token and refuses stages outside the allowlist.
        unauthorized = await client.put(stack.router + PATH_ROUTER_CONFIG, json=stack.config())
        assert unauthorized.status_code == 401
        elsewhere = stack.config(heavy_url="http://203.0.113.7:9000")
        rejected = await client.put(stack.router + PATH_ROUTER_CONFIG, json=elsewhere, headers=AUTH)
        assert rejected.status_code == 400
        assert rejected.json()["error"]["param"] == "heavy_url"
        ok = await client.put(stack.router + PATH_ROUTER_CONFIG, json=stack.config(), headers=AUTH)
        assert ok.status_code == 200
        assert (await client.get(stack.router + PATH_READYZ)).status_code == 200
        # Bad input never reaches a stage: the same 400 the workers give.
        bad = await _post(client, stack.router, "easy", n=99)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
        # Body over the limit: 413 before it is read.
        huge = await client.post(
            stack.router + PATH_GENERATIONS,
            content=b'{"prompt": "' + b"a" * 300_000 + b'"}',
            headers={"content-type": "application/json"},
        )
        assert huge.status_code == 413
        # Over the in-flight limit: 429.
        stack.light_engine.delay_s = 0.3
        first = asyncio.create_task(_post(client, stack.router, "easy slow"))
        await _until(lambda: stack.service.inflight >= 1)
        crowded = await _post(client, stack.router, "easy crowded")
        assert crowded.status_code == 429 and crowded.headers["Retry-After"] == "1"
        assert (await first).status_code == 200


async def test_a_stage_that_cannot_be_reached_is_a_503_with_retry_after() -> None:
    async with _stack() as stack, httpx.AsyncClient(timeout=30) as client:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
        closed.close()
        stack.service._stages.allowed.append(type(stack.service._stages.allowed[0]).parse(dead))
        put = await client.put(
            stack.router + PATH_ROUTER_CONFIG, json=stack.config(entry_url=dead), headers=AUTH
        )
        assert put.status_code == 200
        response = await _post(client, stack.router, "easy")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "stage_unavailable"
    assert response.headers["Retry-After"] == "1"


async def test_a_connection_that_sends_no_request_is_closed_after_the_header_timeout() -> None:
    async with _stack(header_timeout_s=0.3) as stack:
        host, port = stack.router.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            closed = await asyncio.wait_for(reader.read(1), timeout=5.0)
        finally:
            writer.close()
    assert closed == b""  # the router hung up on the silent client
