"""What one router process decides with: its config, its scorer, the calibration window.

`PreGenerationRouter.decide` scores a prompt, adds the score to the calibration window (after
deciding, so a prompt is compared with the ones before it) and applies `rule.route`;
`observe` hands a label (the gate's confidence for a prompt that went through the entry stage)
to the scorer. The scorer survives config changes that keep its kind (a new plan does not make
the learner forget), and is replaced when the config names another scorer.

Nothing is persisted: a restarted router starts from an untrained model and r = 0 routes
nothing until the control plane pushes a share. The learner needs a few hundred labels to beat
a coin, which the gate gives within minutes of traffic; persisting weights would add a volume
to a stateless Deployment and a model-format contract between versions, for those minutes.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from diffcascade_worker.protocol import RouterConfig
from diffcascade_worker.routing.rule import RouteDecision, ScoreWindow, Target, route
from diffcascade_worker.routing.scorers import Scorer, make_scorer

DEFAULT_CALIBRATION = 2000
_SHARE_WINDOW = 1000


@dataclass(frozen=True)
class Destination:
    """Where an accepted request goes: fixed at acceptance, so a config change never moves
    a request in flight."""

    decision: RouteDecision
    url: str
    variant: str
    plan_id: str | None


class PreGenerationRouter:
    def __init__(
        self,
        config: RouterConfig,
        *,
        calibration: int = DEFAULT_CALIBRATION,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.scorer: Scorer | None = make_scorer(config.scorer)
        self.window = ScoreWindow(calibration)
        self._rng = random.Random(seed)
        self._recent: deque[bool] = deque(maxlen=_SHARE_WINDOW)

    def configure(self, config: RouterConfig) -> None:
        if config.scorer != self.config.scorer:
            self.scorer = make_scorer(config.scorer)
            self.window.clear()  # scores of another scorer are not comparable
        self.config = config

    def decide(self, prompt: str) -> Destination:
        config = self.config
        if self.scorer is None:
            decision = RouteDecision(Target.ENTRY, 0.0)
        else:
            score = self.scorer.score(prompt)
            decision = route(
                score,
                share=config.router_share,
                sorted_scores=self.window.sorted_scores,
                exploration=config.exploration_share,
                draw=self._rng.random(),
                tie_draw=self._rng.random(),
            )
            self.window.add(score)
        self._recent.append(decision.target is Target.HEAVY)
        if decision.target is Target.HEAVY and config.heavy_url is not None:
            return Destination(
                decision, config.heavy_url, config.heavy_variant or "heavy", config.plan_id
            )
        return Destination(decision, config.entry_url, config.entry_variant, config.plan_id)

    def observe(self, prompt: str, confidence: float, *, deferred: bool | None = None) -> None:
        if self.scorer is not None:
            self.scorer.learn(prompt, confidence, deferred=deferred)

    def routed_share(self) -> float:
        """Share of the last decisions that went straight to heavy."""
        return sum(self._recent) / len(self._recent) if self._recent else 0.0
