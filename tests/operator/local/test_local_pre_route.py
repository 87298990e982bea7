"""`diffcascade up`'s entry URL routes before generating: the same rule and learner as the
cluster router, fed by the entry stage's gate confidences."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from diffcascade_operator.local.pre_route import LocalPreRouter
from diffcascade_operator.local.router import Router
from diffcascade_worker.protocol import HEADER_ROUTED_TO, RouterConfig
from diffcascade_worker.serving.api_keys import ApiKeys
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class Stage:
    """A stand-in stage answering in the worker's response shape; with a gate, prompts that
    start with 'hard' get confidence 0.1 (deferred), others 0.9."""

    def __init__(self, name: str, *, gate: bool) -> None:
        self.name, self.gate, self.url = name, gate, ""
        self.calls = 0

        async def generate(request: Request) -> Response:
            self.calls += 1
            prompt = (await request.json())["prompt"]
            hard = prompt.startswith("hard")
            image: dict[str, Any] = {"served_by": self.name, "deferred": self.gate and hard}
            if self.gate:
                image["confidence"] = 0.1 if hard else 0.9
            return JSONResponse({"created": 0, "data": [image]})

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


async def test_the_entry_url_learns_from_the_gate_and_then_routes_hard_prompts_to_heavy() -> None:
    router = Router(variants=["light", "heavy"], plan=lambda: {})
    await router.start()
    light, heavy = Stage("light", gate=True), Stage("heavy", gate=False)

    def config(share: float) -> RouterConfig:
        return RouterConfig(
            entry_url=router.stage_url("light"),
            entry_variant="light",
            heavy_url=router.stage_url("heavy"),
            heavy_variant="heavy",
            router_share=share,
            exploration_share=0.0,
        )

    try:
        async with light.serve(), heavy.serve(), httpx.AsyncClient(base_url=router.url) as client:
            router.pools["light"].add(light.url)
            router.pools["heavy"].add(heavy.url)
            router.pre_route = LocalPreRouter(config(0.0))
            for i in range(40):  # r = 0: all through the gate, every answer a label
                kind = "hard" if i % 2 else "easy"
                answer = await client.post(
                    "/v1/images/generations", json={"prompt": f"{kind} thing {i}"}
                )
                assert answer.headers[HEADER_ROUTED_TO] == "entry"
                assert answer.json()["data"][0]["served_by"] == "light"
            router.pre_route.configure(config(0.5))
            served: dict[str, list[str]] = {"hard": [], "easy": []}
            for i in range(40, 60):
                kind = "hard" if i % 2 else "easy"
                answer = await client.post(
                    "/v1/images/generations", json={"prompt": f"{kind} thing {i}"}
                )
                served[kind].append(answer.json()["data"][0]["served_by"])
            named = await client.post(
                "/v1/images/generations", json={"prompt": "hard thing", "model": "light"}
            )
    finally:
        await router.stop()
    state = router.pre_route.state()
    assert state["labels"] >= 40 and state["prequential_auc"] > 0.9  # + the easy ones after
    assert served["hard"].count("heavy") >= 8  # of 10
    assert served["easy"].count("heavy") <= 2
    assert named.json()["data"][0]["served_by"] == "light"  # a named variant is not routed


async def test_with_api_keys_a_prompt_routed_straight_to_heavy_needs_a_key_too(
    tmp_path: Path,
) -> None:
    """`up --api-keys` checks the key at the entry URL before the pre-generation step, so a
    plan that skips the entry stage skips no key check."""
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-team\n")
    router = Router(variants=["light", "heavy"], plan=lambda: {}, api_keys=ApiKeys(keys))
    await router.start()
    light, heavy = Stage("light", gate=True), Stage("heavy", gate=False)
    good = {"Authorization": "Bearer sk-team"}
    try:
        async with light.serve(), heavy.serve(), httpx.AsyncClient(base_url=router.url) as client:
            router.pools["light"].add(light.url)
            router.pools["heavy"].add(heavy.url)
            router.pre_route = LocalPreRouter(
                RouterConfig(
                    entry_url=router.stage_url("light"),
                    entry_variant="light",
                    heavy_url=router.stage_url("heavy"),
                    heavy_variant="heavy",
                    router_share=1.0,  # every scored prompt straight to heavy
                    exploration_share=0.0,
                )
            )
            # The first prompt has no scores to cut at: it calibrates through the entry stage.
            first = await client.post("/v1/images/generations", json={"prompt": "a"}, headers=good)
            refused = [
                await client.post("/v1/images/generations", json=body, headers=headers)
                for body, headers in (
                    ({"prompt": "b"}, {}),
                    ({"prompt": "c"}, {"Authorization": "Bearer sk-other"}),
                    ({"prompt": "d", "model": "heavy"}, {}),  # the heavy stage by name
                )
            ]
            routed = await client.post("/v1/images/generations", json={"prompt": "e"}, headers=good)
    finally:
        await router.stop()
    assert first.headers[HEADER_ROUTED_TO] == "entry"
    for answer in refused:
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_api_key"
    assert routed.status_code == 200 and routed.headers[HEADER_ROUTED_TO] == "heavy"
    assert routed.json()["data"][0]["served_by"] == "heavy"
    assert (light.calls, heavy.calls) == (1, 1)  # the refused prompts reached no stage
