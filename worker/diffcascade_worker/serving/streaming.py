"""`stream: true`: OpenAI's streaming image events over server-sent events.

A deferred query's light image goes out as `image_generation.partial_image` as soon as it
exists; the next stage's image follows as `image_generation.completed`. A confident light
image is the completed one at once. The response starts only with the first event, so any
error before it (full queue, deadline, bad size) is still a plain HTTP error the SDK maps to
its exception classes; an error after a partial arrives as an `error` event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from diffcascade_worker.protocol import (
    EVENT_COMPLETED,
    EVENT_ERROR,
    EVENT_PARTIAL,
    CompletedImageEvent,
    GenerationRequest,
    GenerationResponse,
    PartialImageEvent,
)
from diffcascade_worker.serving.errors import InferenceFailed, WorkerError
from diffcascade_worker.serving.service import Disconnected, WorkerService

logger = logging.getLogger(__name__)

SSE_MEDIA_TYPE = "text/event-stream"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(event: str, data: BaseModel) -> bytes:
    """One server-sent event; JSON has no raw newlines, so one `data:` line suffices."""
    return f"event: {event}\ndata: {data.model_dump_json()}\n\n".encode()


def completed_events(response: GenerationResponse) -> list[CompletedImageEvent]:
    return [
        CompletedImageEvent(
            b64_json=image.b64_json,
            created_at=response.created,
            size=response.size or "auto",
            served_by=image.served_by,
            seed=image.seed,
            confidence=image.confidence,
            deferred=image.deferred,
            degraded=image.degraded,
            nsfw_content_detected=image.nsfw_content_detected,
            queue_ms=image.queue_ms,
            run_ms=image.run_ms,
            total_ms=image.total_ms,
            safety_identifier=response.safety_identifier,
        )
        for image in response.data
    ]


async def _next_partial(
    task: asyncio.Task[GenerationResponse], partials: asyncio.Queue[PartialImageEvent]
) -> PartialImageEvent | None:
    """The next partial image, or None once the generation finished (or failed)."""
    if not partials.empty():
        return partials.get_nowait()
    getter = asyncio.ensure_future(partials.get())
    try:
        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    return None


async def stream_generation(
    service: WorkerService,
    request: GenerationRequest,
    *,
    budget_ms: float | None,
    request_id: str | None,
    deferred_from: str | None = None,
    disconnected: Disconnected | None = None,
    api_key: str | None = None,
) -> StreamingResponse:
    """Run the generation and answer with its events (raises what fails before the first)."""
    partials: asyncio.Queue[PartialImageEvent] = asyncio.Queue()
    task = asyncio.create_task(
        service.generate(
            request,
            budget_ms=budget_ms,
            request_id=request_id,
            on_partial=partials.put_nowait,
            deferred_from=deferred_from,
            disconnected=disconnected,
            api_key=api_key,
        ),
        name="stream-generation",
    )
    try:
        first = await _next_partial(task, partials)
        if first is None:
            task.result()  # an admission or pipeline error: a plain HTTP error response
    except BaseException:
        task.cancel()
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            partial = first
            while partial is not None:
                yield sse(EVENT_PARTIAL, partial)
                partial = await _next_partial(task, partials)
            for event in completed_events(await task):
                yield sse(EVENT_COMPLETED, event)
        except WorkerError as error:
            yield sse(EVENT_ERROR, error.envelope())
        except Exception as error:
            logger.exception("streamed generation failed")
            yield sse(EVENT_ERROR, InferenceFailed(str(error)).envelope())
        finally:
            if not task.done():  # the client went away: stop waiting for the next stage
                task.cancel()

    return StreamingResponse(events(), media_type=SSE_MEDIA_TYPE, headers=_SSE_HEADERS)
