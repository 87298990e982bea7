"""The pre-generation step of `diffcascade up`'s entry URL.

The local entry proxy (`local.router`) already balances each stage's replicas; this adds the
step the `<cascade>` router runs on a cluster, with the same parts: `PreGenerationRouter`
(the routing rule and the scorer, learned by default) decides entry or heavy stage before any
image is made, and every answer of the gated entry stage trains the scorer on the gate's
confidences. One process and one hop, instead of a second proxy in front of the first.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from diffcascade_worker.protocol import (
    HEADER_ROUTED_TO,
    HEADER_ROUTER_EXPLORED,
    HEADER_ROUTER_SCORE,
    RouterConfig,
)
from diffcascade_worker.routing.labels import CompletedEventTap, labels_from_json
from diffcascade_worker.routing.router import PreGenerationRouter
from diffcascade_worker.routing.rule import Target
from starlette.responses import Response, StreamingResponse

Forward = Callable[[str], Awaitable[Response]]


class LocalPreRouter:
    def __init__(self, config: RouterConfig) -> None:
        self.router = PreGenerationRouter(config)

    def configure(self, config: RouterConfig) -> None:
        self.router.configure(config)

    async def handle(self, body: bytes, forward: Forward) -> Response:
        """Decide the stage for this request's prompt, forward, learn from the answer."""
        prompt = _prompt(body)
        if prompt is None:  # not a valid request: the stage answers its 400
            return await forward(self.router.config.entry_variant)
        destination = self.router.decide(prompt)
        response = await forward(destination.variant)
        decision = destination.decision
        response.headers[HEADER_ROUTED_TO] = decision.target.value
        response.headers[HEADER_ROUTER_SCORE] = f"{decision.score:.6g}"
        response.headers[HEADER_ROUTER_EXPLORED] = str(decision.explored).lower()
        if decision.target is not Target.ENTRY or response.status_code != 200:
            return response
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._tap(prompt, response.body_iterator)
        else:
            self._learn(prompt, bytes(response.body))
        return response

    def _learn(self, prompt: str, content: bytes) -> None:
        for confidence, deferred in labels_from_json(content):
            self.router.observe(prompt, confidence, deferred=deferred)

    async def _tap(self, prompt: str, chunks: AsyncIterable[Any]) -> AsyncIterator[Any]:
        tap = CompletedEventTap()
        async for chunk in chunks:
            yield chunk
            raw = chunk if isinstance(chunk, bytes) else str(chunk).encode()
            for confidence, deferred in tap.feed(raw):
                self.router.observe(prompt, confidence, deferred=deferred)

    def state(self) -> dict[str, Any]:
        """For the state document (`diffcascade status`)."""
        config = self.router.config
        scorer = self.router.scorer
        auc = scorer.metrics.auc() if scorer else float("nan")
        return {
            "entry": config.entry_variant,
            "heavy": config.heavy_variant,
            "router_share": config.router_share,
            "exploration_share": config.exploration_share,
            "scorer": config.scorer,
            "labels": scorer.metrics.labels if scorer else 0,
            "prequential_auc": None if auc != auc else round(auc, 4),
            "routed_share": round(self.router.routed_share(), 4),
        }


def _prompt(body: bytes) -> str | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    prompt = parsed.get("prompt") if isinstance(parsed, dict) else None
    return prompt if isinstance(prompt, str) and prompt.strip() else None
