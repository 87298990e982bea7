"""The official `openai` SDK against real worker processes and the local entry URL.

Both targets serve the same contract: images.generate, models.list, 400s the SDK raises as
`BadRequestError` naming the parameter, and images.generate(stream=True) yielding the light
image as a partial before the heavy one completes (relayed event by event by the router).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from diffcascade_operator.local.router import Router
from diffcascade_worker.protocol import HEADER_BUDGET_MS, PATH_GENERATIONS
from worker_testing import Cascade, start_worker

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG"


@pytest.fixture(scope="module")
def entry_url(cascade_processes: Cascade) -> Iterator[str]:
    """The local mode's router in front of the session's light and heavy workers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="router-loop", daemon=True)
    thread.start()
    router = Router(variants=["light", "heavy"], plan=dict, cascade="test")
    url = asyncio.run_coroutine_threadsafe(router.start(), loop).result(timeout=30)
    router.pools["light"].add(cascade_processes.light.url)
    router.pools["heavy"].add(cascade_processes.heavy.url)
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(router.stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(params=["worker", "router"])
def client(request: pytest.FixtureRequest, cascade: Cascade, entry_url: str) -> openai.OpenAI:
    base = cascade.light.url if request.param == "worker" else entry_url
    return openai.OpenAI(api_key="unused", base_url=f"{base}/v1", max_retries=0, timeout=120)


def _extra(item: Any) -> dict[str, Any]:
    return dict(item.model_extra or {})


def test_sdk_generate_returns_png_images_with_cascade_metadata(client: openai.OpenAI) -> None:
    result = client.images.generate(prompt="a lighthouse at dusk", n=2, size="auto", user="u1")
    assert result.data is not None and len(result.data) == 2
    for image in result.data:
        assert image.b64_json is not None
        assert base64.b64decode(image.b64_json).startswith(PNG_MAGIC)
        assert _extra(image)["served_by"] in {"light", "heavy"}
    assert result.safety_identifier == "u1" and result.output_format == "png"


@pytest.mark.parametrize(
    ("arguments", "param"),
    [
        ({"n": 11}, "n"),
        ({"size": "1024x1024"}, "size"),
        ({"response_format": "url"}, "response_format"),
        ({"quality": "hd"}, "quality"),
        ({"style": "natural"}, "style"),
        ({"output_format": "webp"}, "output_format"),
        ({"background": "transparent"}, "background"),
        ({"moderation": "strict"}, "moderation"),
        ({"output_compression": 80}, "output_compression"),
        ({"partial_images": 2}, "partial_images"),
        ({"stream": True, "n": 2}, "n"),
        ({"model": "gpt-image-2"}, "model"),
        ({"extra_body": {"frame_count": 4}}, "frame_count"),
    ],
)
def test_sdk_bad_requests_are_bad_request_errors_naming_the_param(
    client: openai.OpenAI, arguments: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a cat", **arguments)
    assert refused.value.param == param and refused.value.type == "invalid_request_error"


def test_sdk_maps_a_missed_deadline_to_internal_server_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as dropped:
        client.images.generate(prompt="a cat", extra_headers={HEADER_BUDGET_MS: "1"})
    assert dropped.value.status_code == 503 and dropped.value.code == "deadline_exceeded"


def test_sdk_n_above_the_queue_capacity_is_a_bad_request(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Not an endless 429: no retry could ever make room for more images than the queue holds."""
    worker = start_worker(
        model=tiny_models["heavy"], variant="small", logs=tmp_path, args=["--queue-capacity", "4"]
    )
    try:
        worker.wait_ready()
        client = openai.OpenAI(api_key="unused", base_url=f"{worker.url}/v1", max_retries=0)
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(prompt="a cat", n=5)
        assert refused.value.param == "n" and "queue holds" in refused.value.message
        assert client.images.generate(prompt="a cat", n=4).data is not None
    finally:
        worker.terminate()


def test_sdk_models_list_names_the_cascade(client: openai.OpenAI, entry_url: str) -> None:
    ids = [model.id for model in client.models.list().data]
    assert ids[0] == "test"
    routed = str(client.base_url).startswith(entry_url)
    assert ids == (["test", "light", "heavy"] if routed else ["test", "light"])


def _timed_events(client: openai.OpenAI, **arguments: Any) -> list[tuple[float, Any]]:
    stream = client.images.generate(prompt="a hard prompt", stream=True, **arguments)
    return [(time.monotonic(), event) for event in stream]


def test_sdk_stream_sends_the_light_partial_before_the_heavy_completes(
    client: openai.OpenAI, cascade: Cascade
) -> None:
    cascade.light.put_config(threshold=1.0)  # every image is deferred
    heavy = httpx.post(
        cascade.heavy.url + PATH_GENERATIONS, json={"prompt": "warm", "seed": 1}, timeout=60
    ).json()["data"][0]
    events = _timed_events(client, partial_images=1, extra_body={"seed": 5})
    assert [e.type for _, e in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    (sent_partial, partial), (sent_completed, completed) = events
    assert _extra(partial)["served_by"] == "light" and _extra(completed)["served_by"] == "heavy"
    assert partial.b64_json != completed.b64_json
    # Relayed as it happened: the partial came at least a good part of a heavy run earlier.
    assert sent_completed - sent_partial >= 0.3 * heavy["run_ms"] / 1000.0


def test_sdk_stream_of_a_confident_image_is_one_completed_event(
    client: openai.OpenAI, cascade: Cascade
) -> None:
    events = _timed_events(client, partial_images=2)  # threshold 0: nothing is deferred
    assert [e.type for _, e in events] == ["image_generation.completed"]
    assert _extra(events[0][1])["served_by"] == "light"
    assert base64.b64decode(events[0][1].b64_json).startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("quality", "threshold", "served_by", "deferred"),
    [
        ("low", 1.0, "light", False),  # the gate would defer everything: low keeps it light
        ("medium", 1.0, "light", False),
        ("high", 0.0, "heavy", True),  # the gate would defer nothing: high goes on anyway
        ("auto", 1.0, "heavy", True),  # the gate decides
        ("auto", 0.0, "light", False),
    ],
)
def test_sdk_quality_picks_the_stage_whose_image_comes_back(
    client: openai.OpenAI,
    cascade: Cascade,
    quality: str,
    threshold: float,
    served_by: str,
    deferred: bool,
) -> None:
    cascade.light.put_config(threshold=threshold)
    result = client.images.generate(prompt="a lighthouse at dusk", quality=quality)  # type: ignore[arg-type]
    assert result.data is not None
    image = _extra(result.data[0])
    assert (image["served_by"], image["deferred"]) == (served_by, deferred)
    assert image["confidence"] is not None  # the light image was scored either way
