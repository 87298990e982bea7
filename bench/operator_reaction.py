"""Reaction time of the operator to a demand step: Prometheus sees it -> replicas + threshold.

Same set-up as tests/operator/kube: the unmodified operator (KopfRunner) against kmock, two
tiny worker processes registered as the cascade's pods, Debian's Prometheus scraping them
every second. Each trial steps open-loop load on the light worker from 0 to `--qps` and
records, polling every 50 ms:

- seen: the scrape timestamp of the first Prometheus sample whose arrival counter rose;
- replicas: when the light Deployment's `spec.replicas` first rose;
- threshold: when the light worker's own config (GET /v1/cascade/config) first held a new
  threshold.

Reaction = max(replicas, threshold) - seen. Target: within one control interval + 2 s. The
PromQL rate window (`--window`) sets how fast the demand estimate follows the step.

Live profiles are held off (the operator plans with the spec's tables): after a few trials the
measured latency of the tiny workers would replace the spec's table, and a 4-qps step would no
longer need a second light replica, so there would be nothing to react to. This measures the
demand path alone; `--live` keeps live profiles on.

    python -m bench.operator_reaction [--trials 3] [--interval 2] [--window 4] [--models DIR]

Prints a table and writes bench/results/operator_reaction.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.operator_common import (
    RESULTS,
    Cluster,
    bench_env,
    cascade_manifest,
    load,
    machine,
    operator,
    operator_env,
    wait_for,
)

NS, CASCADE = "reaction", "tiny"
SERIES = 'diffcascade_arrived_requests_total{cascade="tiny",variant="light"}'


def _prom_counter(url: str) -> tuple[float, float] | None:
    """(value, scrape timestamp) of the light worker's arrival counter."""
    data = httpx.get(f"{url}/api/v1/query", params={"query": SERIES}).json()
    ts = httpx.get(f"{url}/api/v1/query", params={"query": f"timestamp({SERIES})"}).json()
    rows, stamps = data["data"]["result"], ts["data"]["result"]
    if not rows or not stamps:
        return None
    return float(rows[0]["value"][1]), float(stamps[0]["value"][1])


def trial(bench: Any, cluster: Cluster, *, qps: float, baseline: dict[str, Any]) -> dict[str, Any]:
    worker = bench.workers["light"]
    light = f"{CASCADE}-light"
    before = _prom_counter(bench.prometheus.url)
    start_count = before[0] if before else 0.0
    seen = replicas_at = threshold_at = None
    new_threshold = None
    step = time.time()
    with load(worker.url, qps) as generator:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and (replicas_at is None or threshold_at is None):
            now = time.time()
            if seen is None:
                sample = _prom_counter(bench.prometheus.url)
                if sample is not None and sample[0] > start_count:
                    seen = sample[1]
            if replicas_at is None and (cluster.replicas(NS, light) or 0) > baseline["replicas"]:
                replicas_at = now
            if threshold_at is None:
                pushed = worker.config()["threshold"]
                if abs(pushed - baseline["threshold"]) > 1e-6:
                    threshold_at, new_threshold = now, pushed
            time.sleep(0.05)
        sent = generator.sent
    done = [t for t in (replicas_at, threshold_at) if t is not None]
    reaction = (max(done) - seen) if seen is not None and len(done) == 2 else None
    return {
        "step_at": step,
        "seen_after_step_s": None if seen is None else seen - step,
        "replicas_after_seen_s": None
        if seen is None or replicas_at is None
        else replicas_at - seen,
        "threshold_after_seen_s": None
        if seen is None or threshold_at is None
        else threshold_at - seen,
        "reaction_s": reaction,
        "reaction_from_step_s": (max(done) - step) if len(done) == 2 else None,
        "threshold": [baseline["threshold"], new_threshold],
        "requests_sent": sent,
    }


def _baseline(cluster: Cluster, worker: Any, first: dict[str, Any]) -> dict[str, Any]:
    """Wait until the cascade is back at its low-demand plan (replicas and threshold)."""

    def back() -> bool:
        plan = cluster.status(NS, CASCADE)["allocation"]
        replicas = cluster.replicas(NS, f"{CASCADE}-light")
        return (
            replicas == first["replicas"]
            and plan["threshold"] == first["threshold"]
            and abs(worker.config()["threshold"] - first["threshold"]) < 1e-6
        )

    wait_for(back, timeout=120, what="the low-demand plan")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--qps", type=float, default=4.0)
    parser.add_argument("--live", action="store_true", help="keep live profiles on")
    parser.add_argument("--interval", type=float, default=2.0, help="control interval, s")
    parser.add_argument("--window", type=float, default=4.0, help="PromQL rate window, s")
    parser.add_argument(
        "--ewma-alpha",
        type=float,
        default=None,
        help="spec.control.ewmaAlpha (default: the spec's default); 1 = no smoothing",
    )
    parser.add_argument("--models", type=Path, default=None)
    args = parser.parse_args()

    trials: list[dict[str, Any]] = []
    with bench_env(args.models) as bench:
        cluster = Cluster()
        manifest = cascade_manifest(CASCADE, models=bench.models, interval=args.interval)
        if args.ewma_alpha is not None:
            manifest["spec"]["control"]["ewmaAlpha"] = args.ewma_alpha
        cluster.create_cascade(NS, manifest)
        cluster.create_token_secret(NS, CASCADE)  # owned by the cascade: it must exist first
        env = operator_env(prometheus_url=bench.prometheus.url, tick=0.25)
        env["DIFFCASCADE_METRICS_WINDOW_SECONDS"] = str(args.window)
        if not args.live:
            env["DIFFCASCADE_LIVE_MIN_SAMPLES"] = str(10**9)
            env["DIFFCASCADE_LIVE_MIN_BATCHES"] = str(10**9)
        with operator(env):
            wait_for(lambda: cluster.replicas(NS, f"{CASCADE}-light"), what="Deployments")
            cluster.register_pods(NS, CASCADE, bench.workers)
            wait_for(
                lambda: cluster.status(NS, CASCADE).get("allocation"),
                timeout=60,
                what="a first plan",
            )
            time.sleep(3 * args.interval)
            first = {
                "replicas": cluster.replicas(NS, f"{CASCADE}-light"),
                "threshold": cluster.status(NS, CASCADE)["allocation"]["threshold"],
            }
            for _ in range(args.trials):
                baseline = _baseline(cluster, bench.workers["light"], first)
                trials.append(trial(bench, cluster, qps=args.qps, baseline=baseline))

    reactions = [t["reaction_s"] for t in trials if t["reaction_s"] is not None]
    target = args.interval + 2.0
    result = {
        "benchmark": "operator_reaction",
        "setup": {
            "control_interval_s": args.interval,
            "rate_window_s": args.window,
            "scrape_interval_s": 1.0,
            "live_profiles": args.live,
            "timer_tick_s": 0.25,
            "step_qps": args.qps,
            "ewma_alpha": args.ewma_alpha if args.ewma_alpha is not None else "spec default",
            "api_server": "kmock 0.8 + StampingEmulator",
        },
        "trials": trials,
        "reaction_s": {
            "median": statistics.median(reactions) if reactions else None,
            "max": max(reactions) if reactions else None,
        },
        "target_s": target,
        "met": bool(reactions) and len(reactions) == len(trials) and max(reactions) <= target,
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "operator_reaction.json"
    runs: dict[str, Any] = {}
    if path.exists():
        runs = json.loads(path.read_text()).get("runs", {})
    alpha = args.ewma_alpha or "default"
    runs[f"interval={args.interval:g},window={args.window:g},ewmaAlpha={alpha}"] = result
    document = {"benchmark": "operator_reaction", "runs": runs}
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"{'trial':>5} {'seen-step':>10} {'replicas':>9} {'threshold':>10} {'reaction':>9}")
    for i, t in enumerate(trials):

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        print(
            f"{i:>5} {f(t['seen_after_step_s']):>10} {f(t['replicas_after_seen_s']):>9} "
            f"{f(t['threshold_after_seen_s']):>10} {f(t['reaction_s']):>9}"
        )
    print(
        f"reaction median {result['reaction_s']['median']} s, max {result['reaction_s']['max']} s"
        f" (target <= {target:.1f} s: {'met' if result['met'] else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
