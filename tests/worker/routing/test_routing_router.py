"""The router's decision state: the share and the exploration share hold from the first
prompt (an untrained learner included), a plan change keeps the learner, a new scorer does not."""

from __future__ import annotations

import pytest
from diffcascade_worker.protocol import RouterConfig
from diffcascade_worker.routing.router import PreGenerationRouter
from diffcascade_worker.routing.rule import Target

_CONFIG = RouterConfig(
    entry_url="http://light:8000",
    entry_variant="light",
    heavy_url="http://heavy:8000",
    heavy_variant="heavy",
    router_share=0.3,
    exploration_share=0.2,
)


def test_an_untrained_router_honours_the_share_and_the_exploration_share() -> None:
    router = PreGenerationRouter(_CONFIG, seed=11)
    decisions = [router.decide(f"prompt {i}") for i in range(4000)]
    heavy = sum(d.decision.target is Target.HEAVY for d in decisions) / len(decisions)
    explored = sum(d.decision.explored for d in decisions) / len(decisions)
    assert heavy == pytest.approx(0.3 * 0.8, abs=0.03)
    assert explored == pytest.approx(0.3 * 0.2, abs=0.02)
    assert all(d.url == "http://heavy:8000" for d in decisions if d.decision.target is Target.HEAVY)
    assert all(d.variant == "light" for d in decisions if d.decision.explored)
    assert router.routed_share() == pytest.approx(heavy, abs=0.03)


def test_a_new_plan_keeps_the_learner_and_a_new_scorer_replaces_it() -> None:
    router = PreGenerationRouter(_CONFIG, seed=1)
    learner = router.scorer
    router.observe("a hard prompt", 0.1)
    router.configure(_CONFIG.model_copy(update={"router_share": 0.5, "plan_id": "p2"}))
    assert router.scorer is learner and learner is not None and learner.metrics.labels == 1
    router.configure(_CONFIG.model_copy(update={"scorer": "rule"}))
    assert router.scorer is not learner and router.scorer is not None
    assert router.scorer.name == "rule"


def test_share_without_a_heavy_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a heavy_url"):
        RouterConfig(entry_url="http://light:8000", router_share=0.2)
