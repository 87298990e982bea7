"""Operator time per control tick with 50 cascades in one operator, the solver excluded.

Same parts as tests/operator/kube: kmock as the API server, two tiny worker processes that
every cascade's pods point at, Debian's Prometheus scraping them. Two ways:

- direct: `reconcile.control_step` called for each cascade in turn, as the Kopf timer would,
  plus the status patch Kopf would send; timed per tick minus the time inside `decide()`.
- operator: the unmodified operator (KopfRunner, all namespaces) running every cascade's
  timer for `--seconds`; the per-step times come from `reconcile.RECENT_STEPS` (the status
  patch, done by Kopf after the handler, is not in them). Also reports how many steps ran
  against how many the interval asks for.

A tick reads Prometheus (two instant queries), decides, and patches status; the Deployments
and config PUTs are touched only when the plan changes (steady load here).

    python -m bench.operator_tick [--cascades 50] [--rounds 10] [--seconds 30] [--models DIR]

Prints a table and writes bench/results/operator_tick.json. Target: < 100 ms per tick.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from diffcascade_operator import control
from diffcascade_operator.kube import reconcile
from diffcascade_operator.kube.actuator import PodInfo
from diffcascade_operator.kube.api import KubeApi
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.kube.status import diff_patch
from diffcascade_operator.plan import Plan
from diffcascade_operator.snapshot import Snapshot

from bench.operator_common import (
    GROUP,
    PLURAL,
    RESULTS,
    VERSION,
    Cluster,
    bench_env,
    cascade_manifest,
    machine,
    operator,
    operator_env,
    wait_for,
)

CASCADE = "tiny"
TARGET_MS = 100.0


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "mean": statistics.fmean(ordered),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))],
        "max": ordered[-1],
    }


def _create(cluster: Cluster, bench: Any, count: int, prefix: str) -> list[str]:
    namespaces = [f"{prefix}-{i:02d}" for i in range(count)]
    for ns in namespaces:
        cluster.create_cascade(ns, cascade_manifest(CASCADE, models=bench.models))
        cluster.create_token_secret(ns, CASCADE)  # owned by the cascade: it must exist first
    return namespaces


def _pods(bench: Any) -> list[PodInfo]:
    return [
        PodInfo(
            name=f"{CASCADE}-{variant}-0",
            uid=f"{variant}-uid",
            variant=variant,
            ip="127.0.0.1",
            port=worker.port,
            ready=True,
        )
        for variant, worker in bench.workers.items()
    ]


def direct(bench: Any, cluster: Cluster, *, count: int, rounds: int) -> dict[str, Any]:
    settings = OperatorSettings(
        prometheus_url=bench.prometheus.url, metrics_window_s=4.0, scrape_fallback=False
    )
    api = KubeApi()
    namespaces = _create(cluster, bench, count, "direct")
    states = {ns: reconcile.new_state(settings) for ns in namespaces}
    for ns in namespaces:
        body = cluster.cascade(ns, CASCADE)
        reconcile.apply_children(api=api, body=body, state=states[ns], settings=settings)
    pods = _pods(bench)
    decide_ms: list[float] = []

    def timed_decide(snapshot: Snapshot, previous: Plan | None) -> Plan:
        return control.decide(snapshot, previous)  # control_step times it itself

    ticks: list[float] = []
    solver: list[float] = []
    round_ms: list[float] = []
    for _ in range(rounds):
        bodies = {ns: cluster.cascade(ns, CASCADE) for ns in namespaces}  # Kopf's watch
        replicas = {
            ns: {
                d.metadata.labels["diffcascade.dev/variant"]: d.spec.replicas
                for d in cluster.apps.list_namespaced_deployment(ns).items
            }
            for ns in namespaces
        }  # Kopf's index
        round_start = time.perf_counter()
        for ns in namespaces:
            started = time.perf_counter()
            outcome = reconcile.control_step(
                api=api,
                body=bodies[ns],
                state=states[ns],
                pods=pods,
                deployment_replicas=replicas[ns],
                settings=settings,
                decide=timed_decide,
                force=True,
            )
            assert outcome is not None
            patch = diff_patch(bodies[ns].get("status") or {}, outcome.status)
            if patch:
                cluster.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, ns, PLURAL, CASCADE, {"status": patch}
                )
            total = (time.perf_counter() - started) * 1000
            ticks.append(total - outcome.decide_ms)
            solver.append(outcome.decide_ms)
        round_ms.append((time.perf_counter() - round_start) * 1000 - sum(solver[-count:]))
        time.sleep(0.5)
    del decide_ms
    for ns in namespaces:  # never seen by an operator: no finalizer, gone at once
        cluster.delete_cascade(ns, CASCADE)
    return {
        "operator_ms_per_tick": _summary(ticks),
        "decide_ms_per_tick": _summary(solver),
        "operator_ms_per_round_of_all_cascades": _summary(round_ms),
    }


def full_operator(bench: Any, cluster: Cluster, *, count: int, seconds: float) -> dict[str, Any]:
    namespaces = _create(cluster, bench, count, "operator")
    for ns in namespaces:
        cluster.register_pods(ns, CASCADE, bench.workers)
    env = operator_env(prometheus_url=bench.prometheus.url, scrape_fallback=False, tick=0.5)
    env["DIFFCASCADE_INTERVAL"] = "1"
    with operator(env):
        wait_for(
            lambda: all(cluster.status(ns, CASCADE).get("allocation") for ns in namespaces),
            timeout=120,
            what="a plan for every cascade",
        )
        reconcile.RECENT_STEPS.clear()
        time.sleep(seconds)
        steps = list(reconcile.RECENT_STEPS)
        for ns in namespaces:
            cluster.delete_cascade(ns, CASCADE, timeout=60)
    return {
        "operator_ms_per_tick": _summary([s[0] for s in steps]),
        "decide_ms_per_tick": _summary([s[1] for s in steps]),
        "steps": len(steps),
        "steps_expected": int(count * seconds / 1.0),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cascades", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--mode", choices=["direct", "operator", "both"], default="both")
    parser.add_argument("--models", type=Path, default=None)
    args = parser.parse_args()

    result: dict[str, Any] = {
        "benchmark": "operator_tick",
        "cascades": args.cascades,
        "target_ms": TARGET_MS,
    }
    with bench_env(args.models) as bench:
        cluster = Cluster()
        if args.mode in ("direct", "both"):
            result["direct"] = direct(bench, cluster, count=args.cascades, rounds=args.rounds)
        if args.mode in ("operator", "both"):
            result["operator"] = full_operator(
                bench, cluster, count=args.cascades, seconds=args.seconds
            )
    result["machine"] = machine()
    result["met"] = all(
        result[m]["operator_ms_per_tick"]["p95"] < TARGET_MS
        for m in ("direct", "operator")
        if m in result
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "operator_tick.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.cascades} cascades; operator time per tick, decide() excluded (ms)")
    print(f"{'mode':>9} {'n':>5} {'mean':>7} {'p50':>7} {'p95':>7} {'max':>7} {'decide p50':>11}")
    for mode in ("direct", "operator"):
        if mode in result:
            s, d = result[mode]["operator_ms_per_tick"], result[mode]["decide_ms_per_tick"]
            print(
                f"{mode:>9} {s['n']:>5} {s['mean']:>7.1f} {s['p50']:>7.1f} {s['p95']:>7.1f} "
                f"{s['max']:>7.1f} {d['p50']:>11.1f}"
            )
    if "direct" in result:
        r = result["direct"]["operator_ms_per_round_of_all_cascades"]
        print(f"direct: one round over all cascades, p50 {r['p50']:.0f} ms (sequential)")
    if "operator" in result:
        o = result["operator"]
        print(f"operator: {o['steps']} steps in {o['seconds']:.0f} s ({o['steps_expected']} asked)")
    print(f"target p95 < {TARGET_MS:.0f} ms: {'met' if result['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
