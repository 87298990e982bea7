"""Operator-wide settings, read once from the environment (the CLI turns flags into it).

Kopf loads the handlers module itself, so the environment is the one channel that reaches it
both from `diffcascade operator` and from `kopf run`/KopfRunner.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV_PREFIX = "DIFFCASCADE_"


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class OperatorSettings:
    prometheus_url: str | None = None  # default for cascades without spec.control.prometheusUrl
    interval_s: float | None = None  # overrides every cascade's spec.control.intervalSeconds
    tick_s: float = 1.0  # the Kopf timer's cadence; control steps run every interval on it
    metrics_window_s: float = 60.0  # PromQL rate window
    namespace_label: str | None = None  # Prometheus label holding the pod's namespace
    scrape_fallback: bool = True  # scrape the pods when Prometheus cannot be reached
    worker_image: str = "ghcr.io/diffcascade/worker:0.1.0"
    worker_port: int = 8000
    push_timeout_s: float = 2.0  # per config PUT to a pod
    demand_history: int = 120  # demand samples kept per cascade
    drain_margin_s: float = 30.0  # added to 2 x SLO for terminationGracePeriodSeconds

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env

        def get(key: str) -> str | None:
            value = env.get(ENV_PREFIX + key)
            return value if value not in (None, "") else None

        base = cls()
        interval = get("INTERVAL")
        return cls(
            prometheus_url=get("PROMETHEUS_URL"),
            interval_s=float(interval) if interval else None,
            tick_s=float(get("TICK_SECONDS") or base.tick_s),
            metrics_window_s=float(get("METRICS_WINDOW_SECONDS") or base.metrics_window_s),
            namespace_label=get("PROMETHEUS_NAMESPACE_LABEL"),
            scrape_fallback=_flag(get("SCRAPE_FALLBACK") or "true"),
            worker_image=get("WORKER_IMAGE") or base.worker_image,
            worker_port=int(get("WORKER_PORT") or base.worker_port),
            push_timeout_s=float(get("PUSH_TIMEOUT_SECONDS") or base.push_timeout_s),
            demand_history=int(get("DEMAND_HISTORY") or base.demand_history),
            drain_margin_s=float(get("DRAIN_MARGIN_SECONDS") or base.drain_margin_s),
        )
