"""What the pre-generation router is told, for every driver: entry stage, heavy stage, r.

`router_view` is the adapter between a plan and the router: which variant the plan enters at,
which one is its heavy stage, and its router share. Plans do not name an entry stage or a
router share yet, so the entry is the first variant and r is 0 (the router then sends every
prompt through the gate and only learns); once `Plan` carries them, only this function's
body changes. The heavy stage is the end of the entry's deferral chain (where the gate's
escalations end up), so "straight to heavy" skips exactly the work the gate would add.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from diffcascade_worker.protocol import RouterConfig, RouterScorerName

from diffcascade_operator.plan import Plan
from diffcascade_operator.spec import CascadeSpec
from diffcascade_operator.worker_config import StageUrl, next_stage

DEFAULT_EXPLORATION = 0.05


@dataclass(frozen=True)
class RouterView:
    entry: str
    heavy: str | None
    share: float


def router_view(plan: Plan | None, spec: CascadeSpec) -> RouterView:
    """Entry stage, heavy stage and router share of `plan` (entry = first variant, r = 0
    until plans carry those fields)."""
    entry = str(getattr(plan, "entry_stage", None) or spec.variants[0].name)
    share = float(getattr(plan, "router_share", 0.0) or 0.0)
    heavy: str | None = None
    seen = {entry}
    current = next_stage(plan, spec, entry)
    while current is not None and current not in seen:
        heavy = current
        seen.add(current)
        current = next_stage(plan, spec, current)
    return RouterView(entry=entry, heavy=heavy, share=share if heavy is not None else 0.0)


def router_config(
    plan: Plan | None,
    spec: CascadeSpec,
    *,
    stage_url: StageUrl,
    exploration: float = DEFAULT_EXPLORATION,
    scorer: RouterScorerName = "learned",
    plan_id: str | None = None,
) -> RouterConfig:
    """The document pushed to every router pod (or the local router) for `plan`."""
    view = router_view(plan, spec)
    return RouterConfig(
        entry_url=stage_url(view.entry),
        entry_variant=view.entry,
        heavy_url=stage_url(view.heavy) if view.heavy else None,
        heavy_variant=view.heavy,
        router_share=view.share,
        exploration_share=exploration,
        scorer=scorer,
        plan_id=plan_id,
    )


def router_config_id(config: RouterConfig) -> str:
    """A short hash of what a router is told (pods acknowledge it, as workers do plan ids)."""
    body = config.model_dump_json(exclude={"plan_id"})
    return hashlib.sha256(body.encode()).hexdigest()[:12]
