"""Config and deferral safety, abandoned work and a short drain (fake engines, real HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from diffcascade_worker.protocol import (
    HEADER_DEFERRED_FROM,
    PATH_CONFIG,
    PATH_GENERATIONS,
    PATH_READYZ,
    GenerationResponse,
    ImageData,
    Outcome,
)
from diffcascade_worker.serving.cascade import (
    ForwardFailed,
    NextStageClient,
    NextStagePolicy,
    max_response_bytes,
)
from diffcascade_worker.serving.service import WorkerService
from diffcascade_worker.serving.settings import WorkerSettings
from prometheus_client.parser import text_string_to_metric_families
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
        # Drain only once all twelve are accepted: on a loaded machine a fixed pause may end
        # before the requests reach the worker, and a draining worker refuses new ones itself.
        await _until(
            lambda: service.metrics.inflight._value.get() + _counted(service, Outcome.SERVED) >= 12
        )
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


async def _until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll `condition` (a metric the worker exposes, no event to wait on) until it holds."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _counted(service: WorkerService, outcome: Outcome) -> float:
    """The worker's completions counter for `outcome`, as Prometheus reads it."""
    text = service.metrics.exposition().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "diffcascade_completed_requests_total"
        and sample.labels.get("outcome") == outcome.value
    )


async def _stream_then_hang_up(url: str, seed: int) -> bytes:
    """A streamed request whose client closes its socket right after the partial image."""
    body = json.dumps({"prompt": "hard", "seed": seed, "stream": True, "partial_images": 1})
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {PATH_GENERATIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    partial = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10)
    writer.close()
    return head + partial


async def test_streamed_client_gone_after_the_partial_stops_its_deferral() -> None:
    """Starlette's own disconnect listener cancels the stream before the worker's watcher
    sees the hang-up; the deferral in flight must be cancelled all the same, not run on."""
    heavy_engine = FakeEngine(delay_s=0.4, gate=False)
    heavy_settings = _settings(variant="heavy", port=0, batch_size=1)
    async with _served(heavy_engine, heavy_settings) as (heavy, heavy_url):
        light_settings = _settings(threshold=1.0, next_stage_url=heavy_url, port=0)
        async with _served(FakeEngine(), light_settings) as (light, light_url):
            answers = await asyncio.gather(
                *(_stream_then_hang_up(light_url, seed) for seed in range(4))
            )
            assert all(b"image_generation.partial_image" in a for a in answers), answers
            await asyncio.sleep(4 * heavy_engine.delay_s + 0.5)  # all four, were they run
            light_abandoned = _counted(light, Outcome.ABANDONED)
            heavy_abandoned = _counted(heavy, Outcome.ABANDONED)
            light_inflight = light.metrics.inflight._value.get()
    assert light_abandoned == 4
    assert heavy_abandoned >= 2, heavy_abandoned  # the heavy stage saw its client go too
    assert len(heavy_engine.batches) <= 2, heavy_engine.batches  # not four, for nobody
    assert light_inflight == 0


@contextlib.asynccontextmanager
async def _next_stage_sending(
    body_bytes: int, *, declare: bool
) -> AsyncIterator[tuple[str, list[int]]]:
    """A broken next stage on loopback: it answers 200 with `body_bytes` of zeros (with or
    without a Content-Length); yields its URL and, per request, the bytes it got to send."""
    sent: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        framing = f"Content-Length: {body_bytes}" if declare else "Transfer-Encoding: chunked"
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode()
        )
        chunk = b"0" * (1 << 20)
        sent.append(0)
        try:
            while sent[-1] < body_bytes:
                writer.write(chunk if declare else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                sent[-1] += len(chunk)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", sent
    finally:
        server.close()


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
async def test_a_next_stage_answer_over_the_size_cap_is_refused_without_reading_it(
    declare: bool,
) -> None:
    """An answer is refused as soon as it passes what one PNG of the size can take; the
    loop keeps answering meanwhile (a 1.5 GB answer used to cost GBs and a blocked loop)."""
    limit = max_response_bytes("64x64")
    async with _next_stage_sending(300 * 1024 * 1024, declare=declare) as (url, sent):
        client = NextStageClient(variant="light", timeout_s=30.0)
        gaps: list[float] = []

        async def tick() -> None:
            while True:
                before = asyncio.get_running_loop().time()
                await asyncio.sleep(0.01)
                gaps.append(asyncio.get_running_loop().time() - before)

        ticker = asyncio.create_task(tick())
        try:
            with pytest.raises(ForwardFailed, match="allowed"):
                await client.forward(
                    next_stage_url=url, prompt="p", seed=1, size="64x64", budget_s=30.0
                )
        finally:
            ticker.cancel()
            await client.aclose()
        await asyncio.sleep(0.2)
    assert limit < 2 * 1024 * 1024
    assert sent and sent[0] < limit + 64 * 1024 * 1024, sent  # stopped near the cap, not 300 MB
    assert max(gaps, default=0.0) < 0.5, gaps


async def test_a_next_stage_answer_of_a_real_image_size_passes() -> None:
    image = ImageData(
        b64_json="A" * 1_500_000,
        seed=1,
        served_by="heavy",
        deferred=False,
        queue_ms=0,
        run_ms=1,
        total_ms=1,
    )
    answer = GenerationResponse(created=1, data=[image]).model_dump_json().encode()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    client = NextStageClient(variant="light", timeout_s=30.0)
    try:
        result = await client.forward(
            next_stage_url=f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
            prompt="p",
            seed=1,
            size="512x512",
            budget_s=30.0,
        )
    finally:
        await client.aclose()
        server.close()
    assert result.image.served_by == "heavy" and len(result.image.b64_json or "") == 1_500_000
