"""The pre-generation step of `diffcascade up`'s entry URL.

The local entry proxy (`local.router`) already balances each stage's replicas; this adds the
step the `<cascade>` router runs on a cluster, with the same parts: `PreGenerationRouter`
(the routing rule and the scorer, learned by default) decides entry or heavy stage before any
image is made, and every answer of the gated entry stage trains the scorer on the gate's
confidences. One process and one hop, instead of a second proxy in front of the first.

It counts every arrival it routes in the router's own series (`routing.metrics`, exported on
the entry URL's `/metrics`), so `up` reads its cascade's demand as the operator does: from the
router's count, whatever share the plan sends straight to the heavy stage.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

from diffcascade_worker.protocol import (
    HEADER_ROUTED_TO,
    HEADER_ROUTER_EXPLORED,
    HEADER_ROUTER_SCORE,
    GenerationRequest,
    RouterConfig,
)
from diffcascade_worker.routing.labels import CompletedEventTap, labels_from_json
from diffcascade_worker.routing.metrics import RouterMetrics
from diffcascade_worker.routing.router import PreGenerationRouter
from diffcascade_worker.routing.rule import Target
from starlette.responses import Response, StreamingResponse

Forward = Callable[[str], Awaitable[Response]]


class LocalPreRouter:
    def __init__(self, config: RouterConfig, *, metrics: RouterMetrics) -> None:
        self.router = PreGenerationRouter(config)
        self.metrics = metrics

    def configure(self, config: RouterConfig) -> None:
        self.router.configure(config)

    async def handle(
        self, body: bytes, request: GenerationRequest | None, forward: Forward
    ) -> Response:
        """Decide the stage for this request's prompt, count it, forward, learn from the
        answer. `request` is `body` validated; None: the entry stage answers its 400 (not an
        arrival, as at the router service, which answers it itself)."""
        if request is None:
            return await forward(self.router.config.entry_variant)
        prompt = request.prompt
        destination = self.router.decide(prompt)
        decision = destination.decision
        self.metrics.routed(decision.target, explored=decision.explored, images=request.n)
        response = await forward(destination.variant)
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
