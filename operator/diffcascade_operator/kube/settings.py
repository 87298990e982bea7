"""Operator-wide settings, read once from the environment (the CLI turns flags into it).

Kopf loads the handlers module itself, so the environment is the one channel that reaches it
both from `diffcascade operator` and from `kopf run`/KopfRunner.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast, get_args

from diffcascade_worker.protocol import MAX_EXPLORATION_SHARE, RouterScorerName

from diffcascade_operator.queueing import Dispatch
from diffcascade_operator.snapshot_builder import DEMAND_HISTORY

ENV_PREFIX = "DIFFCASCADE_"


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _words(value: str | None) -> tuple[str, ...]:
    """A space- or comma-separated list."""
    return tuple(w for w in (value or "").replace(",", " ").split() if w)


def _json(key: str, value: str | None, kind: type) -> Any:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_PREFIX}{key} is not JSON: {exc}") from None
    if not isinstance(parsed, kind):
        raise ValueError(f"{ENV_PREFIX}{key} must be a JSON {kind.__name__}")
    return parsed


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
    demand_history: int = DEMAND_HISTORY  # demand samples kept per cascade
    drain_margin_s: float = 30.0  # added to 2 x SLO for terminationGracePeriodSeconds
    # Live profiles (issue 9): the histograms' sliding window and the ProfileDrift rule (see
    # live_profiles.LiveProfileSettings for what each means).
    live_window_s: float = 120.0
    live_min_samples: int = 30
    live_min_batches: int = (
        20  # batches of one size before its measured latency replaces the spec's
    )
    drift_distance: float = 0.1
    drift_min_samples: int = 200
    # The measured SLO (measured_slo.SloSettings): the entry stage's histograms over a sliding
    # window; SLOMet turns False above the plan's promise plus the tolerance.
    slo_window_s: float = 60.0
    slo_tolerance: float = 0.01
    slo_min_requests: int = 20
    metrics_port: int | None = None  # serve the control loop's series (control_metrics) here
    # Image registries (or registry/path prefixes) a cascade's image fields may name; empty:
    # any. The operator's own worker_image is always allowed: the admin chose it.
    allowed_image_registries: tuple[str, ...] = ()
    # Secrets a cascade's env and storage may read (e.g. a model hub token); None: any (no
    # chart), the chart's default: none, since the operator, not the author, creates the pods.
    allowed_env_secrets: tuple[str, ...] | None = None
    # Requests a worker container gets for what its variant's resources leave unset.
    worker_cpu_request: str = "1"
    worker_memory_request: str = "4Gi"
    # A NetworkPolicy per variant: only the operator, earlier stages (the entry stage: the
    # clients), and the scrapers may reach a worker's port.
    network_policy: bool = True
    operator_namespace: str | None = None  # where the operator's pods run (its peer)
    # (The dict-valued fields stay out of the hash, so settings remain hashable.)
    operator_pod_labels: dict[str, str] = field(default_factory=dict, hash=False)
    # NetworkPolicyPeers of Prometheus, and of who may call the entry stage (empty: any).
    scraper_peers: tuple[dict[str, Any], ...] = field(default=(), hash=False)
    client_peers: tuple[dict[str, Any], ...] = field(default=(), hash=False)
    # Model cache PVC for cascades without spec.storage.cacheClaimName; None: an emptyDir.
    model_cache_claim: str | None = None
    # The pre-generation router in front of every cascade (the `<cascade>` Service): it runs
    # from the operator's own image (torch-free, it holds the worker package).
    router: bool = True
    router_image: str = "ghcr.io/diffcascade/operator:0.1.0"
    router_replicas: int = 2
    router_port: int = 8000
    router_cpu_request: str = "100m"
    router_memory_request: str = "256Mi"
    router_exploration: float = 0.05  # share of would-be-heavy prompts still sent to the gate
    router_scorer: RouterScorerName = "learned"
    # How a worker Service spreads queries over its pods, what the allocator plans waiting
    # for (`queueing.Dispatch`): kube-proxy's iptables mode picks at random, IPVS round-robin.
    dispatch: Dispatch = Dispatch.RANDOM
    # Liveness (kube.loop_health): a cascade's loop is stalled after this many of its intervals
    # without a completed control step, and never before stall_min_s.
    stall_intervals: float = 6.0
    stall_min_s: float = 30.0
    api_timeout_s: float = 15.0  # read timeout of each apiserver call the operator makes

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
            live_window_s=float(get("LIVE_WINDOW_SECONDS") or base.live_window_s),
            live_min_samples=int(get("LIVE_MIN_SAMPLES") or base.live_min_samples),
            live_min_batches=int(get("LIVE_MIN_BATCHES") or base.live_min_batches),
            drift_distance=float(get("DRIFT_DISTANCE") or base.drift_distance),
            drift_min_samples=int(get("DRIFT_MIN_SAMPLES") or base.drift_min_samples),
            slo_window_s=float(get("SLO_WINDOW_SECONDS") or base.slo_window_s),
            slo_tolerance=float(get("SLO_TOLERANCE") or base.slo_tolerance),
            slo_min_requests=int(get("SLO_MIN_REQUESTS") or base.slo_min_requests),
            metrics_port=int(port) if (port := get("METRICS_PORT")) else None,
            allowed_image_registries=_words(get("ALLOWED_IMAGE_REGISTRIES")),
            allowed_env_secrets=(
                _words(env[ENV_PREFIX + "ALLOWED_ENV_SECRETS"])
                if ENV_PREFIX + "ALLOWED_ENV_SECRETS" in env
                else None
            ),
            worker_cpu_request=get("WORKER_CPU_REQUEST") or base.worker_cpu_request,
            worker_memory_request=get("WORKER_MEMORY_REQUEST") or base.worker_memory_request,
            network_policy=_flag(get("NETWORK_POLICY") or "true"),
            operator_namespace=get("OPERATOR_NAMESPACE"),
            operator_pod_labels={
                str(k): str(v)
                for k, v in (
                    _json("OPERATOR_POD_LABELS", get("OPERATOR_POD_LABELS"), dict) or {}
                ).items()
            },
            scraper_peers=tuple(_json("SCRAPER_PEERS", get("SCRAPER_PEERS"), list) or ()),
            client_peers=tuple(_json("CLIENT_PEERS", get("CLIENT_PEERS"), list) or ()),
            model_cache_claim=get("MODEL_CACHE_CLAIM"),
            router=_flag(get("ROUTER") or "true"),
            router_image=get("ROUTER_IMAGE") or base.router_image,
            router_replicas=_whole("ROUTER_REPLICAS", get("ROUTER_REPLICAS"), base.router_replicas),
            router_port=_whole("ROUTER_PORT", get("ROUTER_PORT"), base.router_port, high=65535),
            router_cpu_request=get("ROUTER_CPU_REQUEST") or base.router_cpu_request,
            router_memory_request=get("ROUTER_MEMORY_REQUEST") or base.router_memory_request,
            router_exploration=_exploration(get("ROUTER_EXPLORATION"), base.router_exploration),
            router_scorer=_scorer(get("ROUTER_SCORER") or base.router_scorer),
            dispatch=_dispatch(get("DISPATCH") or base.dispatch.value),
            stall_intervals=float(get("STALL_INTERVALS") or base.stall_intervals),
            stall_min_s=float(get("STALL_MIN_SECONDS") or base.stall_min_s),
            api_timeout_s=float(get("API_TIMEOUT_SECONDS") or base.api_timeout_s),
        )


def _dispatch(value: str) -> Dispatch:
    try:
        return Dispatch(value)
    except ValueError:
        known = ", ".join(d.value for d in Dispatch)
        raise ValueError(f"{ENV_PREFIX}DISPATCH must be one of {known}, got {value!r}") from None


def _whole(key: str, value: str | None, default: int, *, high: int | None = None) -> int:
    """A whole number from 1 (to `high`): what a replica count or a port may be."""
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1 or (high is not None and number > high):
        span = "of at least 1" if high is None else f"from 1 to {high}"
        raise ValueError(f"{ENV_PREFIX}{key} must be a whole number {span}, got {value!r}")
    return number


def _exploration(value: str | None, default: float) -> float:
    """The router's exploration share: what its config API accepts (0 to 0.5)."""
    if value is None:
        return default
    try:
        share = float(value)
    except ValueError:
        share = math.nan
    if not 0.0 <= share <= MAX_EXPLORATION_SHARE:
        raise ValueError(
            f"{ENV_PREFIX}ROUTER_EXPLORATION must be a number from 0 to "
            f"{MAX_EXPLORATION_SHARE:g}, got {value!r}"
        )
    return share


def _scorer(value: str) -> RouterScorerName:
    known = get_args(RouterScorerName)
    if value not in known:
        raise ValueError(
            f"{ENV_PREFIX}ROUTER_SCORER must be one of {', '.join(known)}, got {value!r}"
        )
    return cast(RouterScorerName, value)
