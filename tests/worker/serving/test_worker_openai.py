"""The official `openai` SDK against the worker app in-process (fake engines, real FastAPI).

Every documented Images parameter is either honoured or refused with a 400 the SDK raises as
`BadRequestError` naming the parameter; streaming yields OpenAI's image events. The same SDK
against real worker processes and the local router: `test_worker_openai_sdk.py`.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import openai
import pytest
from diffcascade_worker.protocol import PATH_GENERATIONS, PATH_MODELS
from diffcascade_worker.serving.app import create_app
from diffcascade_worker.serving.cascade import NextStageClient
from diffcascade_worker.serving.service import WorkerService
from diffcascade_worker.serving.settings import WorkerSettings
from worker_testing import FakeEngine, fake_loader


def _settings(variant: str, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "model": "fake",
        "variant": variant,
        "cascade": "tiny",
        "size": 64,
        "batch_size": 4,
        "slo_seconds": 30,
        **overrides,
    }
    return WorkerSettings(**values)


@asynccontextmanager
async def _service(
    engine: FakeEngine, settings: WorkerSettings, *, next_stage: httpx.AsyncClient | None = None
) -> AsyncIterator[WorkerService]:
    forwarder = NextStageClient(
        variant=settings.variant, timeout_s=settings.forward_timeout_s, client=next_stage
    )
    service = WorkerService(settings, engine_loader=fake_loader(engine), forwarder=forwarder)
    service.start()
    await asyncio.wait_for(service.loaded.wait(), timeout=10)
    try:
        yield service
    finally:
        await service.close()


def _sdk(service: WorkerService) -> openai.AsyncOpenAI:
    transport = httpx2.ASGITransport(app=create_app(service))
    return openai.AsyncOpenAI(
        api_key="unused",
        base_url="http://worker/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport),
    )


@asynccontextmanager
async def _light_to_heavy(**light: Any) -> AsyncIterator[WorkerService]:
    """An SDK client on a light worker (threshold 0.3) deferring to an in-process heavy."""
    async with _service(FakeEngine(gate=False), _settings("heavy")) as heavy:
        hop = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(heavy)))
        settings = _settings("light", threshold=0.3, next_stage_url="http://heavy:8000", **light)
        async with _service(FakeEngine(), settings, next_stage=hop) as service:
            yield service


def _text(b64: str | None) -> str:
    assert b64 is not None
    return base64.b64decode(b64).decode()


async def test_sdk_generates_and_honours_the_accepted_parameters() -> None:
    async with _light_to_heavy() as light:
        client = _sdk(light)
        result = await client.images.generate(
            prompt="easy lighthouse",
            n=2,
            size="auto",
            quality="auto",
            background="opaque",
            moderation="low",
            output_format="png",
            response_format="b64_json",
            user="user-7",
            model="tiny",
            extra_body={"seed": 11},
        )
    assert result.data is not None and len(result.data) == 2
    assert [_text(image.b64_json) for image in result.data] == [
        "easy lighthouse|11",
        "easy lighthouse|12",
    ]
    assert result.size == "64x64" and result.output_format == "png"
    assert result.safety_identifier == "user-7"  # OpenAI's rule: echoed, user as fallback
    assert result.data[0].model_extra is not None
    assert result.data[0].model_extra["served_by"] == "light"


@pytest.mark.parametrize(
    ("arguments", "param", "fragment"),
    [
        ({"n": 11}, "n", "less than or equal to 10"),
        ({"n": 5}, "n", "queue holds"),  # more than this worker's queue capacity (4)
        ({"size": "1024x1024"}, "size", "serves 64x64"),
        ({"size": "big"}, "size", "512x512"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"quality": "hd"}, "quality", "'high'"),
        ({"style": "vivid"}, "style", "describe the style in the prompt"),
        ({"output_format": "jpeg"}, "output_format", "'png'"),
        ({"background": "transparent"}, "background", "no transparency"),
        ({"moderation": "strict"}, "moderation", "'low'"),
        ({"output_compression": 50}, "output_compression", "jpeg and webp"),
        ({"partial_images": 1}, "partial_images", "stream: true"),
        ({"model": "dall-e-3"}, "model", "GET /v1/models"),
        ({"extra_body": {"complexity": "low"}}, "complexity", "Unknown parameter"),
    ],
)
async def test_sdk_raises_bad_request_naming_each_refused_parameter(
    arguments: dict[str, Any], param: str, fragment: str
) -> None:
    settings = _settings("light", queue_capacity=4)
    async with _service(FakeEngine(), settings) as service:
        client = _sdk(service)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(prompt="a cat", **arguments)
    error = refused.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert error.param == param and fragment in error.message


async def test_models_lists_the_cascade_and_this_variant() -> None:
    async with _service(FakeEngine(), _settings("light")) as service:
        models = await _sdk(service).models.list()
    assert [(m.id, m.object) for m in models.data] == [("tiny", "model"), ("light", "model")]


async def test_model_naming_the_variant_serves_it_alone_without_deferral() -> None:
    async with _light_to_heavy() as light:
        client = _sdk(light)
        alone = await client.images.generate(prompt="hard one", model="light")
        cascaded = await client.images.generate(prompt="hard one", model="tiny")
    assert alone.data is not None and cascaded.data is not None
    assert (alone.data[0].model_extra or {})["served_by"] == "light"
    assert (cascaded.data[0].model_extra or {})["served_by"] == "heavy"


async def test_stream_sends_the_light_image_as_partial_then_the_heavy_as_completed() -> None:
    async with _light_to_heavy() as light:
        client = _sdk(light)
        stream = await client.images.generate(
            prompt="hard question", stream=True, partial_images=2, extra_body={"seed": 3}
        )
        events = [event async for event in stream]
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    partial, completed = events
    assert partial.type == "image_generation.partial_image"
    assert _text(partial.b64_json) == "hard question|3" and partial.partial_image_index == 0
    assert (partial.model_extra or {})["served_by"] == "light"
    assert completed.type == "image_generation.completed"
    assert (completed.model_extra or {})["served_by"] == "heavy"
    assert (completed.model_extra or {})["deferred"] is True and completed.size == "64x64"


@pytest.mark.parametrize(("prompt", "partial_images"), [("easy one", 3), ("hard one", 0)])
async def test_stream_sends_only_the_completed_image_when_confident_or_no_partials_asked(
    prompt: str, partial_images: int
) -> None:
    async with _light_to_heavy() as light:
        client = _sdk(light)
        stream = await client.images.generate(
            prompt=prompt, stream=True, partial_images=partial_images
        )
        events = [event async for event in stream]
    assert [event.type for event in events] == ["image_generation.completed"]
    served_by = "light" if prompt.startswith("easy") else "heavy"
    assert (events[0].model_extra or {})["served_by"] == served_by


async def test_stream_errors_before_the_first_event_are_http_errors() -> None:
    async with _service(FakeEngine(fail=True), _settings("light")) as service:
        client = _sdk(service)
        with pytest.raises(openai.BadRequestError):
            await client.images.generate(prompt="p", stream=True, n=2)
        with pytest.raises(openai.InternalServerError):
            await client.images.generate(prompt="p", stream=True)


async def test_plain_http_stream_is_server_sent_events() -> None:
    async with _light_to_heavy() as light:
        transport = httpx.ASGITransport(app=create_app(light))
        async with httpx.AsyncClient(transport=transport, base_url="http://worker") as raw:
            response = await raw.post(
                PATH_GENERATIONS, json={"prompt": "hard", "stream": True, "partial_images": 1}
            )
            models = await raw.get(PATH_MODELS)
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = response.text.splitlines()
    assert lines[0] == "event: image_generation.partial_image"
    assert "event: image_generation.completed" in lines
    assert models.json()["object"] == "list"
