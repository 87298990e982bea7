"""What the pre-generation router is told, for every driver: entry stage, heavy stage, r.

`router_view` is the adapter between a plan and the router: which variant the plan enters at
(`Plan.entry_stage`), which one is its heavy stage, and its router share (`Plan.router_share`).
The heavy stage is where the plan sends the entry's escalations (the chain of stages that
defer, from the entry on, each to the stage the plan names or else the next variant), so
"straight to heavy" skips exactly the work the gate would add. A plan that defers nothing
from its entry has no heavy stage and routes nothing. Before any plan (None) the entry is
the first variant and r is 0. The router's scorer and exploration share come from the
spec's `router` section, else from the driver's defaults (the operator's settings).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from diffcascade_worker.protocol import RouterConfig, RouterScorerName

from diffcascade_operator.plan import Plan
from diffcascade_operator.spec import DEFAULT_EXPLORATION_SHARE, CascadeSpec
from diffcascade_operator.worker_config import StageUrl, allocation, next_stage

DEFAULT_EXPLORATION = DEFAULT_EXPLORATION_SHARE


@dataclass(frozen=True)
class RouterView:
    entry: str
    heavy: str | None
    share: float


def router_view(plan: Plan | None, spec: CascadeSpec) -> RouterView:
    """Entry stage, heavy stage and router share of `plan` (module doc)."""
    if plan is None:
        entry = spec.variants[0].name
        return RouterView(entry=entry, heavy=next_stage(None, spec, entry), share=0.0)
    entry = plan.entry()
    heavy: str | None = None
    seen = {entry}
    current = _escalates_to(plan, spec, entry)
    while current is not None and current not in seen:
        heavy = current
        seen.add(current)
        current = _escalates_to(plan, spec, current)
    share = plan.router_share if heavy is not None else 0.0
    return RouterView(entry=entry, heavy=heavy, share=share)


def _escalates_to(plan: Plan, spec: CascadeSpec, name: str) -> str | None:
    """Where `name` sends queries under `plan`: the stage the plan names, else the next
    variant when the stage defers at all (threshold > 0), else nowhere (it answers all)."""
    link = allocation(plan, name)
    if link is None:
        return None
    if link.next_stage is not None:
        return link.next_stage
    if link.threshold is not None and link.threshold > 0:
        return next_stage(plan, spec, name)
    return None


def router_config(
    plan: Plan | None,
    spec: CascadeSpec,
    *,
    stage_url: StageUrl,
    exploration: float = DEFAULT_EXPLORATION,
    scorer: RouterScorerName = "learned",
    plan_id: str | None = None,
) -> RouterConfig:
    """The document pushed to every router pod (or the local router) for `plan`.

    `exploration` and `scorer` are the driver's defaults; the spec's `router` section wins.
    """
    view = router_view(plan, spec)
    if spec.router is not None:
        scorer = spec.router.effective_scorer()
        exploration = spec.router.effective_exploration()
    share = view.share if scorer != "none" else 0.0
    return RouterConfig(
        entry_url=stage_url(view.entry),
        entry_variant=view.entry,
        heavy_url=stage_url(view.heavy) if view.heavy else None,
        heavy_variant=view.heavy,
        router_share=share,
        exploration_share=exploration,
        scorer=scorer,
        plan_id=plan_id,
    )


def router_config_id(config: RouterConfig) -> str:
    """A short hash of what a router is told (pods acknowledge it, as workers do plan ids)."""
    body = config.model_dump_json(exclude={"plan_id"})
    return hashlib.sha256(body.encode()).hexdigest()[:12]
