"""Open-loop replay: every arrival is sent at its time, whatever the server does.

In-flight requests are bounded; when the bound is reached the next send waits, and its latency is
still measured from its scheduled arrival, so a slow server cannot hide behind a slow client.
Every request and the whole replay are bounded in time, so a replay always ends by itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from diffcascade_worker.protocol import (
    HEADER_REQUEST_ID,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    PATH_GENERATIONS,
    GenerationResponse,
)
from pydantic import ValidationError

from diffcascade_operator.loadgen.schedule import Arrival, Schedule


@dataclass(frozen=True)
class RequestRecord:
    index: int
    prompt_index: int
    scheduled_s: float  # planned send time, seconds after the replay start
    latency_s: float  # from the scheduled arrival to the answer (or the failure)
    status: int | None  # HTTP status; None when no answer came
    error: str | None  # kind: http_503, timeout, connection, invalid_response, not_sent, ...
    served_by: str | None = None
    deferred: bool = False
    degraded: bool = False
    confidence: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class LoadResult:
    url: str
    schedule: Schedule
    records: tuple[RequestRecord, ...]
    started_at: float  # wall clock (epoch seconds)
    wall_s: float
    interrupted: bool = False  # stopped early: only the arrivals sent so far are recorded


def generations_url(url: str) -> str:
    """The generations endpoint of an entry URL given as a base (`http://host:port`), as the
    OpenAI SDK's base URL (`.../v1`) or as the full endpoint."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"URL must start with http:// or https://, got {url!r}")
    base = url.rstrip("/")
    if base.endswith(PATH_GENERATIONS):
        return base
    api_root = PATH_GENERATIONS.split("/images", 1)[0]  # "/v1", the SDK's base URL ends so
    return base.removesuffix(api_root) + PATH_GENERATIONS


async def run_load(
    *,
    url: str,
    schedule: Schedule,
    prompts: Sequence[str],
    timeout_s: float = 60.0,
    max_inflight: int = 64,
    size: str | None = None,
    save_images: Path | None = None,
    save_count: int = 0,
    on_record: Callable[[RequestRecord], None] | None = None,
    stop: asyncio.Event | None = None,
    api_key: str | None = None,
) -> LoadResult:
    """Replay `schedule` against `url`; ends at most ~2 x timeout_s after the last arrival.

    Setting `stop` ends it early: nothing more is sent, requests in flight are cancelled, and
    the result covers what was sent (`interrupted`).
    """
    stop = stop or asyncio.Event()
    endpoint = generations_url(url)
    if save_images is not None:
        await asyncio.to_thread(save_images.mkdir, parents=True, exist_ok=True)
    slots = asyncio.Semaphore(max_inflight)
    loop = asyncio.get_running_loop()
    records: list[RequestRecord] = []

    def finish(record: RequestRecord) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=max_inflight)
    timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
    started_at = time.time()
    # A cascade that requires client API keys takes them as OpenAI's clients send them.
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        start = loop.time()

        async def send(index: int, arrival: Arrival) -> None:
            try:
                prompt = prompts[arrival.prompt_index % len(prompts)][:MAX_PROMPT_CHARS]
                finish(
                    await _request(
                        client,
                        endpoint=endpoint,
                        index=index,
                        arrival=arrival,
                        prompt=prompt,
                        size=size,
                        timeout_s=timeout_s,
                        elapsed=lambda: loop.time() - start,
                        save_to=save_images if index < save_count else None,
                    )
                )
            finally:
                slots.release()

        tasks: list[asyncio.Task[None]] = []
        sent: set[int] = set()
        send_deadline = schedule.duration_s + timeout_s
        for index, arrival in enumerate(schedule.arrivals):
            delay = start + arrival.at_s - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
            if stop.is_set():
                break
            sent.add(index)
            try:
                async with asyncio.timeout(max(0.0, start + send_deadline - loop.time())):
                    await slots.acquire()
            except TimeoutError:
                finish(_failed(index, arrival, loop.time() - start, "not_sent"))
                continue
            tasks.append(asyncio.create_task(send(index, arrival)))
        if tasks:
            # Each request carries its own timeout; this is a backstop (and `stop` cuts it).
            all_done = asyncio.ensure_future(asyncio.wait(tasks))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait(
                {all_done, stopping}, timeout=timeout_s + 5.0, return_when=asyncio.FIRST_COMPLETED
            )
            all_done.cancel()
            stopping.cancel()
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        wall_s = loop.time() - start
    interrupted = stop.is_set()
    seen = {r.index for r in records}
    for index, arrival in enumerate(schedule.arrivals):
        if index not in seen and (index in sent or not interrupted):
            finish(_failed(index, arrival, wall_s, "cancelled"))
    records.sort(key=lambda r: r.index)
    return LoadResult(
        url=url,
        schedule=schedule,
        records=tuple(records),
        started_at=started_at,
        wall_s=wall_s,
        interrupted=interrupted,
    )


def _failed(index: int, arrival: Arrival, now_s: float, kind: str) -> RequestRecord:
    return RequestRecord(
        index=index,
        prompt_index=arrival.prompt_index,
        scheduled_s=arrival.at_s,
        latency_s=max(0.0, now_s - arrival.at_s),
        status=None,
        error=kind,
    )


async def _request(
    client: httpx.AsyncClient,
    *,
    endpoint: str,
    index: int,
    arrival: Arrival,
    prompt: str,
    size: str | None,
    timeout_s: float,
    elapsed: Callable[[], float],
    save_to: Path | None,
) -> RequestRecord:
    body: dict[str, object] = {
        "prompt": prompt,
        "n": 1,
        "response_format": "b64_json",
        "seed": arrival.prompt_index % (MAX_SEED + 1),
    }
    if size is not None:
        body["size"] = size
    headers = {HEADER_REQUEST_ID: f"load-{index}"}
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.post(endpoint, json=body, headers=headers)
    except (TimeoutError, httpx.TimeoutException):
        return _failed(index, arrival, elapsed(), "timeout")
    except httpx.HTTPError:
        return _failed(index, arrival, elapsed(), "connection")
    latency = max(0.0, elapsed() - arrival.at_s)
    if response.status_code != 200:
        return RequestRecord(
            index=index,
            prompt_index=arrival.prompt_index,
            scheduled_s=arrival.at_s,
            latency_s=latency,
            status=response.status_code,
            error=f"http_{response.status_code}",
        )
    try:
        parsed = GenerationResponse.model_validate_json(response.content)
        image = parsed.data[0]
    except (ValidationError, IndexError):
        return RequestRecord(
            index=index,
            prompt_index=arrival.prompt_index,
            scheduled_s=arrival.at_s,
            latency_s=latency,
            status=response.status_code,
            error="invalid_response",
        )
    if save_to is not None:
        _save_image(save_to / f"{index:04d}-{image.served_by}.png", image.b64_json)
    return RequestRecord(
        index=index,
        prompt_index=arrival.prompt_index,
        scheduled_s=arrival.at_s,
        latency_s=latency,
        status=response.status_code,
        error=None,
        served_by=image.served_by,
        deferred=image.deferred,
        degraded=image.degraded,
        confidence=image.confidence,
    )


def _save_image(path: Path, b64: str) -> None:
    # A bad image is not worth failing the replay for; the record still counts.
    with contextlib.suppress(binascii.Error, OSError):
        path.write_bytes(base64.b64decode(b64, validate=True))
