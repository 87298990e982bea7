"""Deferral: hand one prompt and seed to the next stage and bring its image back.

The remaining budget travels in `HEADER_BUDGET_MS`, so the next stage applies the same
deadline without synchronised clocks (and drops the query itself if it cannot make it). Every
failure here - no budget left, next stage down, slow, refusing, or answering nonsense - is a
`ForwardFailed`; the caller then returns its own image marked degraded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
from pydantic import ValidationError

from diffcascade_worker.protocol import (
    HEADER_BUDGET_MS,
    HEADER_DEFERRED_FROM,
    HEADER_REQUEST_ID,
    PATH_GENERATIONS,
    GenerationRequest,
    GenerationResponse,
    ImageData,
)

logger = logging.getLogger(__name__)

#: Below this much remaining budget a forward is not even tried.
MIN_FORWARD_BUDGET_S = 0.005


class ForwardFailed(Exception):
    """The next stage did not deliver an image in time; the reason is for logs."""


@dataclass(frozen=True)
class ForwardResult:
    image: ImageData  # the next stage's image and its own metadata


def generations_url(next_stage_url: str) -> str:
    """Accept a base URL (`http://heavy:8000`) or the full generations URL."""
    base = next_stage_url.rstrip("/")
    return base if base.endswith(PATH_GENERATIONS) else base + PATH_GENERATIONS


class NextStageClient:
    """A pooled HTTP client for deferrals from one worker."""

    def __init__(
        self,
        *,
        variant: str,
        timeout_s: float,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._variant = variant
        self._timeout_s = timeout_s
        self._client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def forward(
        self,
        *,
        next_stage_url: str,
        prompt: str,
        seed: int,
        size: str,
        budget_s: float,
        request_id: str | None = None,
    ) -> ForwardResult:
        """The next stage's image for (prompt, seed), within min(forward timeout, budget)."""
        if budget_s < MIN_FORWARD_BUDGET_S:
            raise ForwardFailed(f"only {budget_s * 1000:.1f} ms of budget left")
        timeout = min(self._timeout_s, budget_s)
        body = GenerationRequest(prompt=prompt, n=1, size=size, seed=seed)
        headers = {
            HEADER_BUDGET_MS: f"{budget_s * 1000.0:.1f}",
            HEADER_DEFERRED_FROM: self._variant,
        }
        if request_id:
            headers[HEADER_REQUEST_ID] = request_id
        url = generations_url(next_stage_url)
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.post(
                    url,
                    json=body.model_dump(exclude_none=True),
                    headers=headers,
                    timeout=httpx.Timeout(timeout),
                )
        except TimeoutError as error:
            raise ForwardFailed(f"{url} took longer than {timeout:.3f} s") from error
        except httpx.HTTPError as error:
            raise ForwardFailed(f"{url}: {type(error).__name__}: {error}") from error
        if response.status_code != 200:
            raise ForwardFailed(f"{url} answered {response.status_code}: {response.text[:200]}")
        try:
            parsed = GenerationResponse.model_validate_json(response.content)
        except ValidationError as error:
            raise ForwardFailed(f"{url} sent an unreadable response: {error}") from error
        if len(parsed.data) != 1:
            raise ForwardFailed(f"{url} sent {len(parsed.data)} images for one")
        return ForwardResult(image=parsed.data[0])
