"""`diffcascade up`'s entry URL routes before generating: the same rule and learner as the
cluster router, fed by the entry stage's gate confidences."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from diffcascade_operator.loadgen.prompts import load_prompts
from diffcascade_operator.local.cascade import LocalCascade
from diffcascade_operator.local.prometheus import prometheus_binary
from diffcascade_operator.local.router import Router
from diffcascade_operator.local.runner import prepare
from diffcascade_worker.protocol import HEADER_ROUTED_TO, LABEL_TARGET, ROUTER_ROUTED, RouterConfig
from diffcascade_worker.serving.api_keys import ApiKeys
from local_support import cascade_doc
from prometheus_client.parser import text_string_to_metric_families
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
            router.route_by(config(0.0))
            for i in range(40):  # r = 0: all through the gate, every answer a label
                kind = "hard" if i % 2 else "easy"
                answer = await client.post(
                    "/v1/images/generations", json={"prompt": f"{kind} thing {i}"}
                )
                assert answer.headers[HEADER_ROUTED_TO] == "entry"
                assert answer.json()["data"][0]["served_by"] == "light"
            router.route_by(config(0.5))
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
            # A request a worker would refuse (400) goes to the entry stage unrouted, uncounted.
            await client.post("/v1/images/generations", json={"prompt": " "})
            exported = (await client.get("/metrics")).text
    finally:
        await router.stop()
    assert router.pre_route is not None
    state = router.pre_route.state()
    assert state["labels"] >= 40 and state["prequential_auc"] > 0.9  # + the easy ones after
    assert served["hard"].count("heavy") >= 8  # of 10
    assert served["easy"].count("heavy") <= 2
    assert named.json()["data"][0]["served_by"] == "light"  # a named variant is not routed
    # The entry URL counts every arrival in the cluster router's series: the demand `up` plans
    # with, whichever stage each prompt was sent to.
    routed = _routed(exported)
    straight = served["hard"].count("heavy") + served["easy"].count("heavy")
    assert routed == {"entry": 61 - straight, "heavy": straight}, routed
    assert light.calls == 61 - straight + 1 and heavy.calls == straight


def _routed(exposition: str) -> dict[str, float]:
    """Images by target in the diffcascade_router_routed_images counter of a /metrics page."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == ROUTER_ROUTED.exposed:
                target = sample.labels[LABEL_TARGET]
                counts[target] = counts.get(target, 0.0) + sample.value
    return counts


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
            router.route_by(
                RouterConfig(
                    entry_url=router.stage_url("light"),
                    entry_variant="light",
                    heavy_url=router.stage_url("heavy"),
                    heavy_variant="heavy",
                    router_share=1.0,  # every prompt straight to heavy, the first one too
                    exploration_share=0.0,
                )
            )
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
    for answer in refused:
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "invalid_api_key"
    assert routed.status_code == 200 and routed.headers[HEADER_ROUTED_TO] == "heavy"
    assert routed.json()["data"][0]["served_by"] == "heavy"
    assert (light.calls, heavy.calls) == (0, 1)  # the refused prompts reached no stage


@pytest.mark.slow
@pytest.mark.parametrize("prometheus", [True, False], ids=["prometheus", "direct-scrape"])
async def test_up_plans_with_every_arrival_when_its_plan_routes_prompts_straight_to_heavy(
    tiny_models: dict[str, Path], tmp_path: Path, prometheus: bool
) -> None:
    """A table whose one row routes every prompt straight to heavy (r = 1: no other row for a
    demand spike to move to, no cold scorer's first cuts): the light stage sees none of the
    arrivals, and `up` still plans with all of them (the entry URL's router counter, read by
    its Prometheus and by the direct-scrape fallback alike)."""
    if prometheus and prometheus_binary() is None:
        pytest.skip("Debian's prometheus is not installed (scripts/install-system-deps.sh)")
    doc = cascade_doc(tiny_models, name="routed")
    doc["spec"]["qualityTable"] = {
        "rows": [
            {
                "light": "light",
                "heavy": "heavy",
                "routerShare": 1,
                "escalateShare": 0,
                "fid": 12,
            },
        ]
    }
    doc["spec"]["router"] = {"scorer": "rule", "explorationShare": 0}
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(doc))
    name, spec, profiles = prepare(path, base_dir=tmp_path)
    cascade = LocalCascade(
        name=name,
        spec=spec,
        profiles=profiles,
        run_dir=tmp_path / "run",
        base_dir=tmp_path,
        use_prometheus=prometheus,
    )
    qps, seconds = 0.75, 16.0  # within one tiny heavy worker: the plan keeps r = 1
    prompts = load_prompts()
    shares: list[float] = []  # the router share of every config the entry URL is told
    route_by = cascade.router.route_by

    def recording(config: RouterConfig) -> None:
        shares.append(config.router_share)
        route_by(config)

    cascade.router.route_by = recording  # type: ignore[method-assign]
    try:
        await cascade.start()
        url = await cascade.wait_ready(120)
        assert cascade.plan is not None and cascade.plan.router_share == 1.0
        shares.clear()  # from here on: the configs told while the load runs
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            started = time.time()
            sent = [
                asyncio.create_task(_post_at(client, started + i / qps, prompts[i]))
                for i in range(int(qps * seconds))
            ]
            answers = await asyncio.gather(*sent)
            ended = time.time()
        await asyncio.sleep(1.5)  # the tick after the last arrival
    finally:
        await cascade.stop()
    # A tiny heavy worker on a busy machine can miss its /readyz probes for a moment: those
    # prompts get the router's 503 no_replica (clients retry after a second); no other error.
    refused = [a.json()["error"]["code"] for a in answers if a.status_code != 200]
    assert set(refused) <= {"no_replica"} and len(refused) <= len(answers) // 4, refused
    targets = [a.headers.get(HEADER_ROUTED_TO) for a in answers if a.status_code == 200]
    # The plan routes. On a busy machine a tick that sees the heavy worker unready may plan
    # without the row for a moment (r < 1): only then may a prompt go to the entry stage.
    if min(shares, default=1.0) == 1.0:
        assert set(targets) == {"heavy"}, targets
    assert targets.count("heavy") >= len(targets) // 2, (targets, shares)
    # The demand samples of the ticks while the load ran (the first seconds warm the rates up).
    measured = [
        m["measured_qps"]
        for m in cascade.timeline
        if started + 3.0 <= m["at"] <= ended and m["measured_qps"] is not None
    ]
    assert len(measured) >= 3, list(cascade.timeline)
    # Without the router's count the samples were the light stage's arrivals: none.
    assert sum(measured) / len(measured) >= 0.75 * qps, measured


async def _post_at(client: httpx.AsyncClient, at: float, prompt: str) -> httpx.Response:
    await asyncio.sleep(max(0.0, at - time.time()))
    return await client.post("/v1/images/generations", json={"prompt": prompt})
