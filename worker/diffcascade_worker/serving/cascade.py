"""Deferral: hand one prompt and seed to the next stage and bring its image back.

The remaining budget travels in `HEADER_BUDGET_MS`, so the next stage applies the same
deadline without synchronised clocks (and drops the query itself if it cannot make it). Every
failure here - no budget left, next stage down, slow, refusing, or answering nonsense - is a
`ForwardFailed`; the caller then returns its own image marked degraded.

A next stage's answer is read with a byte cap (`max_response_bytes`: what one PNG of the image
size can take) and parsed off the event loop, so a broken or hostile stage costs neither
gigabytes nor a blocked worker.

Where a stage may defer is not up to whoever holds the config token alone: `NextStagePolicy`
admits only the cascade's own later stages (given at start-up by the operator or `diffcascade
up`), never the worker itself, and a request that was itself deferred is never deferred again,
so a misconfigured loop ends after one hop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

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
    parse_size,
)

logger = logging.getLogger(__name__)

#: Below this much remaining budget a forward is not even tried.
MIN_FORWARD_BUDGET_S = 0.005
#: Room for the JSON around the image (metadata, error messages) in a next stage's answer.
RESPONSE_SLACK_BYTES = 1024 * 1024
#: How much of a refused answer is kept for the log line.
_ERROR_EXCERPT_BYTES = 4096


def max_response_bytes(size: str) -> int:
    """The most a next stage's answer for one image of `size` may hold: the base64 of an
    uncompressed 4-channel PNG (deflate never grows data by more than a few per mille), plus
    `RESPONSE_SLACK_BYTES`. About 2.4 MB at 512x512, 6.6 MB at 1024x1024."""
    width, height = parse_size(size)
    raw = (width * 4 + 1) * height * 1.01 + 4096  # + filter bytes, deflate blocks, chunks
    return int(raw * 4 / 3) + RESPONSE_SLACK_BYTES


class ForwardFailed(Exception):
    """The next stage did not deliver an image in time; the reason is for logs."""


@dataclass(frozen=True)
class ForwardResult:
    image: ImageData  # the next stage's image and its own metadata


_LOCAL_HOSTS = frozenset({"localhost", "0.0.0.0", "::"})


@dataclass(frozen=True)
class StageAddress:
    """A next-stage base URL reduced to what identifies it; port None means any port."""

    scheme: str
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, url: str, *, wildcard_port: bool = False) -> StageAddress:
        text = url
        any_port = False
        if wildcard_port and ":*" in url:
            text, any_port = url.replace(":*", "", 1), True
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host: {url!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"credentials, query or fragment in a stage URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)  # ValueError if bad
        path = parts.path.rstrip("/")
        path = path.removesuffix(PATH_GENERATIONS).rstrip("/")
        return cls(parts.scheme, parts.hostname.lower(), None if any_port else port, path)

    def matches(self, other: StageAddress) -> bool:
        """`other` (a concrete URL) is this entry of an allowlist."""
        return (
            self.scheme == other.scheme
            and self.host == other.host
            and (self.port is None or self.port == other.port)
            and self.path == other.path
        )


class NextStagePolicy:
    """Which next-stage URLs a config may name: the allowlist, never this worker itself."""

    def __init__(
        self,
        *,
        allowed: Iterable[str],
        own_port: int,
        own_names: Iterable[str] = (),
    ) -> None:
        self.allowed = [StageAddress.parse(url, wildcard_port=True) for url in allowed]
        self._own_port = own_port
        self._own_names = {name.lower() for name in own_names if name}

    def problem(self, url: str) -> str | None:
        """Why `url` may not be this worker's next stage, or None when it may."""
        try:
            address = StageAddress.parse(url)
        except ValueError as error:
            return str(error)
        if self._is_self(address):
            return f"next_stage_url {url} is this worker itself: a stage cannot defer to itself"
        if not any(entry.matches(address) for entry in self.allowed):
            return (
                f"next_stage_url {url} is not one of this cascade's stages "
                f"(allowed: {', '.join(_show(a) for a in self.allowed) or 'none'})"
            )
        return None

    def _is_self(self, address: StageAddress) -> bool:
        if address.host.split(".", 1)[0] in self._own_names:
            return True
        if address.port != self._own_port:
            return False
        if address.host in _LOCAL_HOSTS:
            return True
        try:
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            return False
        return ip.is_loopback or ip.is_unspecified


def _show(address: StageAddress) -> str:
    port = "*" if address.port is None else str(address.port)
    return f"{address.scheme}://{address.host}:{port}{address.path}"


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
        api_key: str | None = None,
    ) -> ForwardResult:
        """The next stage's image for (prompt, seed), within min(forward timeout, budget);
        with the client's `api_key`, which a next stage that checks keys needs."""
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
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        url = generations_url(next_stage_url)
        limit = max_response_bytes(size)
        try:
            async with asyncio.timeout(timeout):
                status, content = await self._post(
                    url,
                    body=body.model_dump(exclude_none=True),
                    headers=headers,
                    limit=limit,
                    timeout_s=timeout,
                )
        except TimeoutError as error:
            raise ForwardFailed(f"{url} took longer than {timeout:.3f} s") from error
        except httpx.HTTPError as error:
            raise ForwardFailed(f"{url}: {type(error).__name__}: {error}") from error
        if status != 200:
            excerpt = content[:200].decode(errors="replace")
            raise ForwardFailed(f"{url} answered {status}: {excerpt}")
        try:
            # Megabytes of JSON take milliseconds to parse: not on the event loop.
            parsed = await asyncio.to_thread(GenerationResponse.model_validate_json, content)
        except ValidationError as error:
            raise ForwardFailed(f"{url} sent an unreadable response: {error}") from error
        if len(parsed.data) != 1:
            raise ForwardFailed(f"{url} sent {len(parsed.data)} images for one")
        return ForwardResult(image=parsed.data[0])

    async def _post(
        self,
        url: str,
        *,
        body: dict[str, object],
        headers: dict[str, str],
        limit: int,
        timeout_s: float,
    ) -> tuple[int, bytes]:
        """Status and body of the POST; a body over `limit` bytes is a ForwardFailed as soon
        as it is declared or read that far (of an error answer, only an excerpt is read)."""
        request = self._client.build_request(
            "POST", url, json=body, headers=headers, timeout=httpx.Timeout(timeout_s)
        )
        response = await self._client.send(request, stream=True)
        try:
            keep = limit if response.status_code == 200 else _ERROR_EXCERPT_BYTES
            declared = response.headers.get("content-length", "")
            if response.status_code == 200 and declared.isdigit() and int(declared) > limit:
                raise ForwardFailed(f"{url} announced {declared} bytes, over the {limit} allowed")
            chunks: list[bytes] = []
            read = 0
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                read += len(chunk)
                if read > keep:
                    if response.status_code == 200:
                        raise ForwardFailed(f"{url} sent more than the {limit} bytes allowed")
                    break
            return response.status_code, b"".join(chunks)
        finally:
            await response.aclose()
