"""Config and deferral safety, abandoned work and a short drain (fake engines, real HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from diffcascade_worker.protocol import (
    HEADER_DEFERRED_FROM,
    PATH_CONFIG,
    PATH_GENERATIONS,
    PATH_READYZ,
)
from diffcascade_worker.serving.cascade import NextStageClient, NextStagePolicy
from diffcascade_worker.serving.service import WorkerService
from diffcascade_worker.serving.settings import WorkerSettings
from worker_testing import FakeEngine, fake_loader, served_in_process

TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(**overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "model": "fake",
        "variant": "light",
        "cascade": "c",
        "size": 64,
        "token": TOKEN,
        "slo_seconds": 30,
        "port": 8000,
        **overrides,
    }
    return WorkerSettings(**values)


@contextlib.asynccontextmanager
async def _served(
    engine: FakeEngine, settings: WorkerSettings, *, forward: httpx.AsyncClient | None = None
) -> AsyncIterator[tuple[WorkerService, str]]:
    forwarder = NextStageClient(variant=settings.variant, timeout_s=10.0, client=forward)
    service = WorkerService(settings, engine_loader=fake_loader(engine), forwarder=forwarder)
    async with served_in_process(service) as url:
        yield service, url


async def _put(client: httpx.AsyncClient, url: str, **changes: Any) -> httpx.Response:
    return await client.put(url + PATH_CONFIG, json=changes, headers=AUTH)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"slo_seconds": 1e-300}, "slo_seconds"),
        ({"slo_seconds": 5e-324}, "slo_seconds"),
        ({"max_batch_wait_ms": 5000, "slo_seconds": 2}, "max_batch_wait_ms"),
        ({"slo_seconds": 0.05}, "shorter than one batch"),  # a batch takes 0.2 s here
    ],
)
async def test_config_that_would_refuse_every_request_is_a_400(
    changes: dict[str, Any], fragment: str
) -> None:
    async with (
        _served(FakeEngine(delay_s=0.2), _settings()) as (service, url),
        httpx.AsyncClient() as client,
    ):
        refused = await _put(client, url, **changes)
        assert refused.status_code == 400, refused.text
        assert fragment in refused.json()["error"]["message"]
        assert service.config.slo_seconds == 30  # nothing changed


@pytest.mark.parametrize(
    "target",
    [
        "http://capture.example:9000",  # any host
        "http://heavy:8000/v1/images/generations#",  # a fragment picks the path
        "http://heavy:8000/steal?x=",
        "http://user:pw@heavy:8000",
        "http://127.0.0.1:8000",  # this worker itself (it listens on 8000)
        "http://c-light.ns.svc:8000",  # this worker's own Service
    ],
)
async def test_next_stage_outside_the_cascade_is_refused(target: str) -> None:
    settings = _settings(
        next_stage_url="http://heavy:8000", allowed_next_stages=("http://heavier:8000",)
    )
    async with _served(FakeEngine(), settings) as (service, url), httpx.AsyncClient() as client:
        refused = await _put(client, url, next_stage_url=target)
        allowed = await _put(client, url, next_stage_url="http://heavier:8000/")
        back = await _put(client, url, next_stage_url="http://heavy:8000")
        off = await _put(client, url, next_stage_url="")
    assert refused.status_code == 400, refused.text
    assert (allowed.status_code, back.status_code, off.status_code) == (200, 200, 200)
    assert service.config.next_stage_url is None


def test_allowlist_entry_with_port_star_matches_any_port_of_that_host() -> None:
    policy = NextStagePolicy(allowed=["http://127.0.0.1:*/stages/heavy"], own_port=8000)
    assert policy.problem("http://127.0.0.1:9123/stages/heavy/") is None
    assert policy.problem("http://127.0.0.1:9123/stages/other") is not None
    assert policy.problem("http://127.0.0.1:8000/stages/heavy") is not None  # itself


async def test_worker_refuses_to_start_deferring_to_itself() -> None:
    with pytest.raises(ValueError, match="itself"):
        WorkerService(_settings(next_stage_url="http://localhost:8000"))


async def test_a_deferred_request_is_never_deferred_again() -> None:
    """Two stages configured to defer to each other: a query stops after one hop."""
    hops: list[str] = []

    async def record(request: httpx.Request) -> None:
        hops.append(str(request.url))

    heavy_settings = _settings(
        variant="heavy", port=0, threshold=1.0, allowed_next_stages=("http://127.0.0.1:*",)
    )
    async with _served(FakeEngine(), heavy_settings) as (_, heavy_url):
        forward = httpx.AsyncClient(event_hooks={"request": [record]})
        light_settings = _settings(threshold=1.0, next_stage_url=heavy_url, port=0)
        async with (
            _served(FakeEngine(), light_settings, forward=forward) as (_, light_url),
            httpx.AsyncClient(timeout=10) as client,
        ):
            # the heavy stage defers back to the light one: a misconfigured loop
            assert (await _put(client, heavy_url, next_stage_url=light_url)).status_code == 200
            response = await client.post(
                light_url + PATH_GENERATIONS, json={"prompt": "hard one", "seed": 3}
            )
            direct = await client.post(
                heavy_url + PATH_GENERATIONS,
                json={"prompt": "hard one", "seed": 3},
                headers={HEADER_DEFERRED_FROM: "light"},
            )
        await forward.aclose()
    image = response.json()["data"][0]
    assert image["served_by"] == "heavy" and image["deferred"]
    assert len(hops) == 1  # light -> heavy, and the heavy stage did not send it back
    assert direct.json()["data"][0]["served_by"] == "heavy"
    assert not direct.json()["data"][0]["deferred"]


async def test_queued_images_of_a_client_that_disconnected_are_not_generated() -> None:
    engine = FakeEngine(delay_s=0.3)
    async with _served(engine, _settings(batch_size=1, port=0)) as (_, url):
        async with httpx.AsyncClient(timeout=10) as client:
            abandoned = [
                asyncio.create_task(
                    client.post(url + PATH_GENERATIONS, json={"prompt": "p", "seed": i})
                )
                for i in range(12)
            ]
            await asyncio.sleep(0.4)  # all queued, the first one running
            for task in abandoned:
                task.cancel()  # the clients hang up
            await asyncio.gather(*abandoned, return_exceptions=True)
        await asyncio.sleep(0.2)
        started = asyncio.get_running_loop().time()
        async with httpx.AsyncClient(timeout=10) as client:
            fresh = await client.post(url + PATH_GENERATIONS, json={"prompt": "p", "seed": 99})
        waited = asyncio.get_running_loop().time() - started
    assert fresh.status_code == 200
    assert waited < 1.5, f"the next request waited {waited:.1f} s behind abandoned work"
    assert len(engine.batches) <= 4  # the running one (and a straggler), not all twelve


async def test_drain_shorter_than_the_backlog_refuses_the_rest_in_the_error_envelope() -> None:
    engine = FakeEngine(delay_s=0.25)
    settings = _settings(batch_size=1, port=0, drain_timeout_s=0.6, queue_capacity=64)
    async with _served(engine, settings) as (service, url), httpx.AsyncClient(timeout=20) as client:
        requests = [
            asyncio.create_task(
                client.post(url + PATH_GENERATIONS, json={"prompt": "p", "seed": i})
            )
            for i in range(12)
        ]
        await asyncio.sleep(0.2)
        unfinished = await service.drain()
        responses = await asyncio.gather(*requests)
        ready = await client.get(url + PATH_READYZ)
    codes = sorted(r.status_code for r in responses)
    refused = [r for r in responses if r.status_code != 200]
    assert unfinished == len(refused) > 0
    assert set(codes) <= {200, 503}, codes
    assert all(r.json()["error"]["code"] == "not_ready" for r in refused)
    assert service.refused_at_drain == len(refused)
    assert ready.status_code == 503
