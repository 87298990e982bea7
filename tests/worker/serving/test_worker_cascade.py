"""Two real worker processes on loopback, light -> heavy, tiny pipelines on CPU.

The processes are started once per session (`cascade_processes`); each test starts from the
baseline config (`Cascade.reset`) and pushes what it needs.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from diffcascade_worker.gate.calibration import read_curve
from diffcascade_worker.models.tiny import tiny_prompts
from diffcascade_worker.protocol import (
    COMPLETIONS,
    HEADER_BUDGET_MS,
    PATH_CONFIG,
    PATH_GENERATIONS,
    GenerationResponse,
    ImageData,
)
from worker_testing import AUTH, Cascade, free_port, metric

pytestmark = pytest.mark.slow

#: Allowed gap between the observed deferral share and the calibrated f(t). Same prompts and
#: seeds as calibration make it exact in principle; batch composition can move a confidence
#: that sits right at the threshold by float rounding, hence a small allowance.
DEFER_FRACTION_TOLERANCE = 0.1


async def _generate(
    client: httpx.AsyncClient,
    url: str,
    prompt: str,
    *,
    seed: int | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {"prompt": prompt}
    if seed is not None:
        body["seed"] = seed
    return await client.post(url + PATH_GENERATIONS, json=body, headers=headers, timeout=120)


async def _images(url: str, prompts: list[str], seeds: list[int]) -> list[ImageData]:
    async with httpx.AsyncClient() as client:
        responses = await asyncio.gather(
            *(_generate(client, url, p, seed=s) for p, s in zip(prompts, seeds, strict=True))
        )
    for response in responses:
        assert response.status_code == 200, response.text
    return [GenerationResponse.model_validate(r.json()).data[0] for r in responses]


def _completions(cascade: Cascade, outcome: str) -> float:
    return metric(cascade.light.metrics(), COMPLETIONS.exposed, outcome=outcome)


async def test_threshold_zero_serves_everything_from_the_light_stage(cascade: Cascade) -> None:
    prompts = tiny_prompts(8)
    images = await _images(cascade.light.url, prompts, list(range(8)))
    assert {i.served_by for i in images} == {"light"}
    assert not any(i.deferred or i.degraded for i in images)
    assert all(i.confidence is not None and 0.0 <= i.confidence <= 1.0 for i in images)


async def test_threshold_one_serves_everything_from_the_heavy_stage(cascade: Cascade) -> None:
    cascade.light.put_config(threshold=1.0)
    before = _completions(cascade, "deferred")
    images = await _images(cascade.light.url, tiny_prompts(6), list(range(6)))
    assert {i.served_by for i in images} == {"heavy"}
    assert all(i.deferred and not i.degraded for i in images)
    assert _completions(cascade, "deferred") - before == 6


async def test_intermediate_threshold_defers_the_calibrated_fraction(cascade: Cascade) -> None:
    record = json.loads((cascade.light_dir / "diffcascade.json").read_text())
    curve = read_curve(cascade.light_dir / record["deferCurve"])
    # The prompts and seeds tiny.make_tiny_model calibrated with: the prompt set after the
    # gate's training prompts, seed base + index.
    from diffcascade_worker.models import tiny

    offset = tiny._GATE_IMAGES_PER_CLASS
    prompts = tiny_prompts(curve.prompts, offset=offset)
    seeds = [record["seed"] * 10_000 + offset + i for i in range(curve.prompts)]
    threshold = min(curve.thresholds, key=lambda t: abs(curve.defer_fraction(t) - 0.5))
    expected = curve.defer_fraction(threshold)
    assert 0.2 <= expected <= 0.8, "the calibrated curve has no intermediate point"

    cascade.heavy.put_config(batch_size=8)
    cascade.light.put_config(threshold=threshold, batch_size=8)
    images = await _images(cascade.light.url, prompts, seeds)

    observed = sum(i.deferred for i in images) / len(images)
    assert all(i.served_by == ("heavy" if i.deferred else "light") for i in images)
    assert abs(observed - expected) <= DEFER_FRACTION_TOLERANCE, (threshold, observed, expected)
    gaps = sorted(
        abs((i.confidence or 0.0) - c) for i, c in zip(images, curve.confidences, strict=True)
    )
    assert gaps[len(gaps) // 2] < 0.01, "served confidences differ from the calibrated ones"


async def test_batches_form_under_concurrent_load(cascade: Cascade) -> None:
    cascade.light.put_config(batch_size=8)
    name = "diffcascade_batch_size"
    before = cascade.light.metrics()
    await _images(cascade.light.url, tiny_prompts(24), list(range(24)))
    after = cascade.light.metrics()
    batches = metric(after, name + "_count") - metric(before, name + "_count")
    singles = metric(after, name + "_bucket", le="1.0") - metric(before, name + "_bucket", le="1.0")
    images = metric(after, name + "_sum") - metric(before, name + "_sum")
    assert images == 24
    assert batches < 24 and batches - singles > 0, (batches, singles)


async def test_tiny_budget_is_dropped_with_503_retry_after_and_counted(cascade: Cascade) -> None:
    before = _completions(cascade, "dropped")
    async with httpx.AsyncClient() as client:
        response = await _generate(
            client, cascade.light.url, "a cat", headers={HEADER_BUDGET_MS: "1"}
        )
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert _completions(cascade, "dropped") - before == 1


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        time.sleep(5)
        self.send_response(500)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def slow_next_stage() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _SlowHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


async def test_deferral_that_would_miss_the_deadline_returns_the_light_image_degraded(
    cascade: Cascade, slow_next_stage: str
) -> None:
    cascade.light.put_config(threshold=1.0, next_stage_url=slow_next_stage)
    before = _completions(cascade, "degraded")
    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        response = await _generate(
            client, cascade.light.url, "a cat", seed=1, headers={HEADER_BUDGET_MS: "1500"}
        )
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    image = response.json()["data"][0]
    assert image["served_by"] == "light" and image["deferred"] and image["degraded"]
    assert elapsed < 4.5, "the forward was not bounded by the remaining budget"
    assert _completions(cascade, "degraded") - before == 1


async def test_next_stage_down_degrades_instead_of_failing(cascade: Cascade) -> None:
    cascade.light.put_config(threshold=1.0, next_stage_url=f"http://127.0.0.1:{free_port()}")
    async with httpx.AsyncClient() as client:
        response = await _generate(client, cascade.light.url, "a cat", seed=2)
    assert response.status_code == 200
    image = response.json()["data"][0]
    assert image["served_by"] == "light" and image["degraded"]


async def test_config_push_takes_effect_without_restart(cascade: Cascade) -> None:
    url = cascade.light.url + PATH_CONFIG
    async with httpx.AsyncClient() as client:
        assert (await client.put(url, json={"threshold": 1.0})).status_code == 401
        bad = await client.put(url, json={"batch_size": 0}, headers=AUTH)
        assert bad.status_code == 400 and "batch_size" in bad.json()["error"]["message"]
        first = await _generate(client, cascade.light.url, "a cat", seed=5)
        pushed = await client.put(url, json={"threshold": 1.0, "plan_id": "p-1"}, headers=AUTH)
        assert pushed.status_code == 200 and pushed.json()["plan_id"] == "p-1"
        second = await _generate(client, cascade.light.url, "a cat", seed=5)
        current = (await client.get(url, headers=AUTH)).json()
    assert first.json()["data"][0]["served_by"] == "light"
    assert second.json()["data"][0]["served_by"] == "heavy"
    assert current["threshold"] == 1.0
    assert metric(cascade.light.metrics(), "diffcascade_threshold") == 1.0
