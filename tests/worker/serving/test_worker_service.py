"""The service and routes in-process (fake engines, real FastAPI app, real HTTP between stages)."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from diffcascade_worker.protocol import (
    HEADER_BUDGET_MS,
    HEADER_DEFERRED_FROM,
    PATH_CONFIG,
    PATH_GENERATIONS,
    PATH_HEALTHZ,
    PATH_METRICS,
    PATH_READYZ,
    GenerationResponse,
)
from diffcascade_worker.serving.app import create_app
from diffcascade_worker.serving.cascade import NextStageClient
from diffcascade_worker.serving.service import State, WorkerService
from diffcascade_worker.serving.settings import WorkerSettings
from worker_testing import FakeEngine, fake_loader

TOKEN = "secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _settings(variant: str, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "model": "fake",
        "variant": variant,
        "size": 64,
        "batch_size": 4,
        "token": TOKEN,
        "slo_seconds": 30,
        **overrides,
    }
    return WorkerSettings(**values)


@asynccontextmanager
async def _worker(
    engine: FakeEngine,
    settings: WorkerSettings,
    *,
    next_stage: httpx.AsyncClient | None = None,
    wait: bool = True,
) -> AsyncIterator[tuple[WorkerService, httpx.AsyncClient]]:
    forwarder = NextStageClient(
        variant=settings.variant, timeout_s=settings.forward_timeout_s, client=next_stage
    )
    service = WorkerService(settings, engine_loader=fake_loader(engine), forwarder=forwarder)
    app = create_app(service)
    service.start()  # httpx's ASGI transport does not run the lifespan
    if wait:
        await asyncio.wait_for(service.loaded.wait(), timeout=10)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        client.app_transport = transport  # type: ignore[attr-defined]
        try:
            yield service, client
        finally:
            if service.loaded.is_set():
                await service.close()


Received = list[httpx.Request]


@asynccontextmanager
async def _cascade(
    *, threshold: float, light_engine: FakeEngine | None = None, **light: Any
) -> AsyncIterator[tuple[WorkerService, httpx.AsyncClient, Received]]:
    """light -> heavy, both in-process; the heavy's requests are recorded."""
    received: Received = []

    async def record(request: httpx.Request) -> None:
        received.append(request)

    async with _worker(FakeEngine(gate=False), _settings("heavy")) as (_, heavy_client):
        hop = httpx.AsyncClient(
            transport=heavy_client.app_transport,  # type: ignore[attr-defined]
            event_hooks={"request": [record]},
        )
        settings = _settings(
            "light", threshold=threshold, next_stage_url="http://heavy:8000", **light
        )
        async with _worker(light_engine or FakeEngine(), settings, next_stage=hop) as (
            service,
            client,
        ):
            yield service, client, received


def _decoded(image: dict[str, Any]) -> str:
    return base64.b64decode(image["b64_json"]).decode()


async def test_gate_defers_low_confidence_images_to_the_next_stage() -> None:
    async with _cascade(threshold=0.3) as (_, client, received):
        hard = await client.post(PATH_GENERATIONS, json={"prompt": "hard one", "seed": 3})
        easy = await client.post(PATH_GENERATIONS, json={"prompt": "easy one", "seed": 4})
    assert hard.status_code == 200 and easy.status_code == 200
    hard_image, easy_image = hard.json()["data"][0], easy.json()["data"][0]
    assert hard_image["served_by"] == "heavy" and hard_image["deferred"] is True
    assert hard_image["confidence"] == pytest.approx(0.1)
    assert _decoded(hard_image) == "hard one|3"  # the heavy ran the same prompt and seed
    assert easy_image["served_by"] == "light" and easy_image["deferred"] is False
    assert len(received) == 1
    assert received[0].headers[HEADER_DEFERRED_FROM] == "light"
    assert 0 < float(received[0].headers[HEADER_BUDGET_MS]) <= 30_000


@pytest.mark.parametrize(("threshold", "deferred"), [(0.0, 0), (1.0, 3)])
async def test_threshold_zero_defers_nothing_and_one_defers_everything(
    threshold: float, deferred: int
) -> None:
    async with _cascade(threshold=threshold) as (_, client, received):
        for prompt in ("hard", "easy", "middle"):
            response = await client.post(PATH_GENERATIONS, json={"prompt": prompt})
            assert response.status_code == 200
    assert len(received) == deferred


async def test_stage_without_next_stage_url_never_defers() -> None:
    async with _worker(FakeEngine(), _settings("last", threshold=1.0)) as (_, client):
        response = await client.post(PATH_GENERATIONS, json={"prompt": "hard"})
    image = response.json()["data"][0]
    assert image["served_by"] == "last" and image["deferred"] is False
    assert image["confidence"] == pytest.approx(0.1)


async def test_unreachable_next_stage_returns_the_light_image_degraded() -> None:
    settings = _settings(
        "light", threshold=1.0, next_stage_url="http://127.0.0.1:9", forward_timeout_s=5
    )
    async with _worker(FakeEngine(), settings) as (service, client):
        response = await client.post(PATH_GENERATIONS, json={"prompt": "hard", "seed": 1})
        metrics = (await client.get(PATH_METRICS)).text
    image = response.json()["data"][0]
    assert response.status_code == 200
    assert image["served_by"] == "light" and image["deferred"] and image["degraded"]
    assert _decoded(image) == "hard|1"
    assert 'outcome="degraded"' in metrics and service.state is State.READY


async def test_n_images_get_consecutive_seeds_one_work_item_each() -> None:
    engine = FakeEngine()
    async with _worker(engine, _settings("solo", batch_size=8)) as (_, client):
        response = await client.post(PATH_GENERATIONS, json={"prompt": "p", "n": 3, "seed": 41})
    body = GenerationResponse.model_validate(response.json())
    assert [d.seed for d in body.data] == [41, 42, 43]
    assert engine.batches[-1] == [41, 42, 43]
    assert all(d.total_ms >= d.queue_ms >= 0 for d in body.data)


@pytest.mark.parametrize(
    ("body", "headers", "fragment", "param"),
    [
        ({"prompt": ""}, {}, "prompt", "prompt"),
        ({"prompt": "   "}, {}, "non-whitespace", "prompt"),
        ({"prompt": "x" * 4001}, {}, "prompt", "prompt"),
        ({"prompt": "p", "n": 0}, {}, "'n'", "n"),
        ({"prompt": "p", "n": 11}, {}, "'n'", "n"),
        ({"prompt": "p", "size": "1024x1024"}, {}, "unsupported size", "size"),
        ({"prompt": "p", "size": "big"}, {}, "size", "size"),
        ({"prompt": "p", "response_format": "url"}, {}, "response_format", "response_format"),
        ({"prompt": "p", "unknown": 1}, {}, "Unknown parameter: 'unknown'", "unknown"),
        ({"prompt": "p"}, {HEADER_BUDGET_MS: "soon"}, "budget", None),
        ({"prompt": "p"}, {HEADER_BUDGET_MS: "-5"}, "budget", None),
    ],
)
async def test_bad_input_is_400_naming_the_param_in_the_openai_envelope(
    body: dict[str, Any], headers: dict[str, str], fragment: str, param: str | None
) -> None:
    async with _worker(FakeEngine(), _settings("v")) as (_, client):
        response = await client.post(PATH_GENERATIONS, json=body, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"]
    assert error["param"] == param and error["code"]


async def test_config_needs_the_token_and_a_valid_document() -> None:
    async with _worker(FakeEngine(), _settings("v")) as (service, client):
        assert (await client.get(PATH_CONFIG)).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        refused = await client.put(PATH_CONFIG, json={"threshold": 0.5}, headers=wrong)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        bad = await client.put(PATH_CONFIG, json={"threshold": 2}, headers=AUTH)
        assert bad.status_code == 400 and "threshold" in bad.json()["error"]["message"]
        bad_url = await client.put(PATH_CONFIG, json={"next_stage_url": "ftp://x"}, headers=AUTH)
        assert bad_url.status_code == 400
        ok = await client.put(PATH_CONFIG, json={"threshold": 0.5, "batch_size": 2}, headers=AUTH)
        assert ok.status_code == 200 and ok.json()["threshold"] == 0.5
        assert service.config.batch_size == 2
        assert (await client.get(PATH_CONFIG, headers=AUTH)).json()["batch_size"] == 2
        metrics = (await client.get(PATH_METRICS)).text
    assert 'diffcascade_threshold{cascade="default",variant="v"} 0.5' in metrics
    assert 'diffcascade_configured_batch_size{cascade="default",variant="v"} 2.0' in metrics


async def test_readyz_turns_200_only_after_loading_and_warm_up() -> None:
    release = threading.Event()
    engine = FakeEngine(block=release)
    async with _worker(engine, _settings("v"), wait=False) as (service, client):
        assert (await client.get(PATH_HEALTHZ)).status_code == 200
        loading = await client.get(PATH_READYZ)
        assert loading.status_code == 503 and loading.json()["status"] == "not-ready"
        early = await client.post(PATH_GENERATIONS, json={"prompt": "p"})
        assert early.status_code == 503 and early.headers["Retry-After"] == "1"
        release.set()
        await asyncio.wait_for(service.loaded.wait(), timeout=10)
        assert (await client.get(PATH_READYZ)).status_code == 200


async def test_load_failure_is_reported_and_fatal() -> None:
    def broken(_settings: WorkerSettings) -> FakeEngine:
        raise RuntimeError("no such model")

    fatal: list[str] = []
    service = WorkerService(_settings("v"), engine_loader=broken)
    service.on_fatal = fatal.append
    service.start()
    await asyncio.wait_for(service.loaded.wait(), timeout=10)
    ready, status = service.readiness()
    assert not ready and "no such model" in (status.detail or "")
    assert fatal and "no such model" in fatal[0]
    await service.close()


async def test_draining_refuses_new_requests_and_finishes_accepted_ones() -> None:
    engine = FakeEngine(delay_s=0.2)
    async with _worker(engine, _settings("v", batch_size=1)) as (service, client):
        accepted = [
            asyncio.create_task(client.post(PATH_GENERATIONS, json={"prompt": f"p{i}"}))
            for i in range(3)
        ]
        for _ in range(1000):
            if service.metrics.inflight._value.get() >= 3:
                break
            await asyncio.sleep(0.01)
        service.begin_drain()
        late = await client.post(PATH_GENERATIONS, json={"prompt": "late"})
        ready = await client.get(PATH_READYZ)
        assert await service.wait_idle(10)
        done = await asyncio.gather(*accepted)
    assert late.status_code == 503 and ready.json()["status"] == "draining"
    assert [r.status_code for r in done] == [200, 200, 200]


async def test_full_queue_answers_429_with_retry_after() -> None:
    engine = FakeEngine(delay_s=0.3)
    async with _worker(engine, _settings("v", batch_size=1, queue_capacity=2)) as (_, client):
        responses = await asyncio.gather(
            *(client.post(PATH_GENERATIONS, json={"prompt": f"p{i}"}) for i in range(6))
        )
        metrics = (await client.get(PATH_METRICS)).text
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    assert 'outcome="rejected"' in metrics


async def test_tiny_budget_is_dropped_with_503_and_retry_after() -> None:
    async with _worker(FakeEngine(delay_s=0.05), _settings("v")) as (service, client):
        service._batcher.latency.observe(1, 0.05)  # type: ignore[union-attr]
        response = await client.post(
            PATH_GENERATIONS, json={"prompt": "p"}, headers={HEADER_BUDGET_MS: "1"}
        )
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert response.json()["error"]["code"] == "deadline_exceeded"


async def test_openapi_schema_documents_models_and_errors() -> None:
    async with _worker(FakeEngine(), _settings("v")) as (_, client):
        schema = (await client.get("/openapi.json")).json()
    post = schema["paths"][PATH_GENERATIONS]["post"]
    assert {"400", "429", "503"} <= set(post["responses"]) and "422" not in post["responses"]
    assert "GenerationResponse" in str(post["responses"]["200"])
    assert "ErrorResponse" in str(post["responses"]["429"])
    assert schema["paths"][PATH_CONFIG]["put"]["security"]
