"""Every policy on the paper's three MAF traces, side by side (simulator benchmark).

Cascade sd-turbo -> sd-v1.5, SLO 5 s; maf_1to8qps on 4 GPUs, maf_2to16qps on 8, maf_4to32qps
on 16 (the paper's trace-to-cluster mapping). Prints a markdown table, writes it with the
targets to bench/RESULTS-simulator.md and the raw summaries to bench/results/sim_compare.json.

    .venv/bin/python bench/sim_compare.py              # the full table (18 runs)
    .venv/bin/python bench/sim_compare.py --startup-seconds 10 --no-write   # a sensitivity run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from diffcascade_operator.control import decide
from diffcascade_operator.profiles import fid_at, profiles_from_spec
from diffcascade_operator.sim.engine import Dispatch
from diffcascade_operator.sim.policies import POLICIES, DecidePolicy
from diffcascade_operator.sim.report import write_outputs
from diffcascade_operator.sim.run import simulate
from diffcascade_operator.sim.scenarios import Scenario, load_scenario, override
from diffcascade_operator.sim.traces import load_trace

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TRACES = (("maf_1to8qps", 4), ("maf_2to16qps", 8), ("maf_4to32qps", 16))
#: The lighter traces on the paper's whole 16-GPU testbed: load well below capacity.
SUPPLEMENT = (("maf_1to8qps", 16), ("maf_2to16qps", 16))
SUPPLEMENT_POLICIES = ("diffcascade", "diffserve", "proteus", "static")
COLUMNS = (
    ("policy", "policy", "{}"),
    ("violation ratio", "slo_violation_ratio", "{:.4f}"),
    ("mean FID", "mean_fid", "{:.2f}"),
    ("p99 s", "p99_latency_s", "{:.2f}"),
    ("light share", "light_share", "{:.3f}"),
    ("late", "late", "{}"),
    ("dropped", "dropped", "{}"),
    ("degraded", "degraded", "{}"),
    ("GPU-s", "gpu_seconds", "{:.0f}"),
    ("solve p95 ms", "solve_ms_p95", "{:.1f}"),
    ("decide CPU p95 ms", "decide_cpu_ms_p95", "{:.1f}"),
    ("wall s", "wall_s", "{:.2f}"),
)


#: Ablations: which part of diffcascade's advantage comes from where.
ABLATIONS = {
    "diffserve+control": "MaxThreshold with diffcascade's control settings (trend, hysteresis)",
    "diffcascade-no-degrade": "diffcascade without degraded answers",
}


def ablation_policy(name: str, scenario: Scenario) -> DecidePolicy:
    spec = scenario.spec
    quality = profiles_from_spec(spec, base_dir=scenario.base_dir).quality
    if name == "diffserve+control":
        paper = override(spec, objective="MaxThreshold")
        return DecidePolicy(name=name, spec=paper, decider=decide, degrade=False, quality=quality)
    return DecidePolicy(name=name, spec=spec, decider=decide, degrade=False, quality=quality)


def oracle_fid(scenario: Scenario, trace_name: str, *, window_s: float = 5.0) -> float:
    """Mean FID of a steady-state oracle: each 5-s window's demand known exactly and served
    at the best light share the GPUs allow (light at its best batch within the SLO; heavy at
    its best batch that fits the SLO after the fastest light batch; no queueing, no noise).
    A bound on what any policy can reach, used to judge the FID target."""
    spec = scenario.spec
    profiles = profiles_from_spec(spec, base_dir=scenario.base_dir)
    quality = profiles.quality
    assert quality is not None
    light = {b: ms / 1000 for b, ms in profiles.variants[0].batch_latency_ms.items()}
    heavy = {b: ms / 1000 for b, ms in profiles.variants[-1].batch_latency_ms.items()}
    slo = spec.slo_seconds
    p_light = max(b / s for b, s in light.items() if s <= slo)
    fastest = min(light.values())
    p_heavy = max((b / s for b, s in heavy.items() if fastest + s <= slo), default=0.0)
    trace = load_trace(trace_name)
    counts = [0] * (int(trace.duration_s // window_s) + 1)
    for at in trace.arrivals_s:
        counts[int(at // window_s)] += 1
    grid = [k / 100 for k in range(101)]
    fids = []
    for count in counts:
        if not count:
            continue
        demand = count / window_s
        best = fid_at(quality, 1.0)
        for x_light in range(1, spec.gpu_budget):
            if x_light * p_light < demand:
                continue
            lowest_share = 1.0 - min(1.0, (spec.gpu_budget - x_light) * p_heavy / demand)
            best = min([best] + [fid_at(quality, g) for g in grid if g >= lowest_share - 1e-9])
        fids.append(best)
    return sum(fids) / len(fids)


def fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def table(rows: list[dict[str, Any]], policies: list[str] | None = None) -> str:
    lines = []
    groups = list(dict.fromkeys((r["trace"], r["gpus"]) for r in rows))
    for trace, gpus in groups:
        subset = [
            r
            for r in rows
            if (r["trace"], r["gpus"]) == (trace, gpus)
            and (policies is None or r["policy"] in policies)
        ]
        if policies is not None:
            subset.sort(key=lambda r: policies.index(r["policy"]))
        if not subset:
            continue
        lines.append(f"\n**{trace}, {gpus} GPUs** ({subset[0]['requests']} requests)\n")
        lines.append("| " + " | ".join(c[0] for c in COLUMNS) + " |")
        lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
        for r in subset:
            lines.append("| " + " | ".join(fmt(r[key], p) for _, key, p in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict[str, Any]], oracle: dict[str, float]) -> tuple[str, bool]:
    by = {(r["trace"], r["policy"]): r for r in rows}
    lines, ok = [], True
    gains = []
    for trace, _ in TRACES:
        ours, paper = by.get((trace, "diffcascade")), by.get((trace, "diffserve"))
        if ours is None or paper is None:
            continue
        v_ok = ours["slo_violation_ratio"] <= paper["slo_violation_ratio"]
        gain = 1.0 - ours["mean_fid"] / paper["mean_fid"]
        gains.append(gain)
        ok &= v_ok
        bound = oracle.get(trace)
        limit = (
            ""
            if bound is None
            else f"; a steady-state oracle reaches {bound:.2f}, "
            f"{1.0 - bound / paper['mean_fid']:+.1%} better"
        )
        lines.append(
            f"- {trace}: violation {ours['slo_violation_ratio']:.4f} vs diffserve "
            f"{paper['slo_violation_ratio']:.4f} ({'ok' if v_ok else 'MISSED'}); "
            f"mean FID {ours['mean_fid']:.2f} vs {paper['mean_fid']:.2f} ({gain:+.1%} better"
            f"{limit})"
        )
    fid_ok = any(g >= 0.05 for g in gains)
    ok &= fid_ok
    lines.append(
        f"- FID at least 5% lower than diffserve on at least one trace: "
        f"{'ok' if fid_ok else 'MISSED'} (best {max(gains, default=0.0):+.1%})"
    )
    solves = [r["solve_ms_p95"] for r in rows if r["solve_ms_p95"] is not None]
    cpus = [r["decide_cpu_ms_p95"] for r in rows if r["decide_cpu_ms_p95"] is not None]
    solve_ok = bool(solves) and max(solves) <= 20.0
    ok &= solve_ok
    lines.append(
        f"- allocator solve p95 <= 20 ms: {'ok' if solve_ok else 'MISSED'} "
        f"(worst run {max(solves, default=float('nan')):.1f} ms wall as decide() reports it; "
        f"CPU time of the whole decide() call p95 {max(cpus, default=float('nan')):.1f} ms; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
    )
    walls = [r["wall_s"] for r in rows]
    wall_ok = max(walls) < 10.0
    ok &= wall_ok
    lines.append(
        f"- a 347-s trace simulates in under 10 s: {'ok' if wall_ok else 'MISSED'} "
        f"(slowest run {max(walls):.2f} s)"
    )
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="sdturbo-sdv15")
    parser.add_argument("--slo-seconds", type=float, default=5.0)
    parser.add_argument("--startup-seconds", type=float, default=None)
    parser.add_argument("--dispatch", default=Dispatch.LEAST_LOADED.value)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sim-compare")
    parser.add_argument("--png", action="store_true", help="Also draw each run's timeline")
    parser.add_argument("--no-write", action="store_true", help="Print only")
    parser.add_argument(
        "--no-extras", action="store_true", help="Skip the ablation and start-up delay runs"
    )
    parser.add_argument(
        "--extra-startup-seconds",
        type=float,
        default=10.0,
        help="Start-up delay of the sensitivity runs",
    )
    args = parser.parse_args(argv)
    policies = args.policies.split(",")
    rows: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    started = time.perf_counter()
    jobs: list[tuple[str, str, float | None, bool]] = [
        (p, p, args.startup_seconds, True) for p in policies
    ]
    if not args.no_extras:
        jobs += [(a, a, args.startup_seconds, False) for a in ABLATIONS]
        jobs += [
            (p, f"{p}@startup{args.extra_startup_seconds:g}s", args.extra_startup_seconds, False)
            for p in ("diffcascade", "diffserve", "proteus")
        ]
    plans = [(t, g, jobs) for t, g in TRACES]
    if not args.no_extras:
        plans += [
            (t, g, [(p, p, args.startup_seconds, False) for p in SUPPLEMENT_POLICIES])
            for t, g in SUPPLEMENT
        ]
    for trace_name, gpus, todo in plans:
        trace = load_trace(trace_name)
        scenario = load_scenario(args.scenario, gpus=gpus, slo_seconds=args.slo_seconds)
        for policy, label, startup, main_table in todo:
            run = simulate(
                scenario=scenario,
                trace=trace,
                policy_name=policy,
                startup_s=startup,
                dispatch=Dispatch(args.dispatch),
                policy=ablation_policy(policy, scenario) if policy in ABLATIONS else None,
            )
            if label != policy:
                run = replace(run, summary=replace(run.summary, policy=label))
            write_outputs(
                args.out / f"{trace_name}-{gpus}gpu-{label}",
                result=run.result,
                summary=run.summary,
                quality=run.quality,
                png=args.png,
            )
            row = run.summary.to_json()
            (rows if main_table else extras).append(row)
            print(
                f"{trace_name:>13} {gpus:>2} GPUs {label:>24}: violations "
                f"{row['slo_violation_ratio']:.4f} FID {fmt(row['mean_fid'], '{:.2f}')} "
                f"wall {row['wall_s']:.2f}s",
                file=sys.stderr,
            )
    total = time.perf_counter() - started
    body = table(rows)
    oracle = {
        t: oracle_fid(load_scenario(args.scenario, gpus=g, slo_seconds=args.slo_seconds), t)
        for t, g in TRACES
    }
    checks, ok = targets(rows, oracle)
    extra_body = ""
    if extras:
        ablation = ["diffserve", "diffserve+control", "diffcascade-no-degrade", "diffcascade"]
        main_gpus = dict(TRACES)
        light_load = [r for r in extras if main_gpus.get(r["trace"]) != r["gpus"]]
        extra_body += (
            "\n## Lighter load: the small traces on all 16 GPUs\n\n"
            "The paper's testbed size with the traces it ran on 4 and 8 GPUs: demand stays "
            "well below capacity, where MaxThreshold defers everything.\n"
            + table(light_load, list(SUPPLEMENT_POLICIES))
        )
        extras_main = [r for r in extras if main_gpus.get(r["trace"]) == r["gpus"]]
        extra_body += (
            "\n## Ablation: where diffcascade's advantage comes from\n\n"
            "`diffserve+control` = MaxThreshold with diffcascade's control settings (EWMA + "
            "upward trend, 30-s scale-down stabilisation); `diffcascade-no-degrade` = "
            "MinExpectedFID without degraded answers.\n" + table(rows + extras_main, ablation)
        )
        delayed = [r["policy"] for r in extras if "@startup" in r["policy"]]
        order = list(dict.fromkeys(delayed))
        extra_body += (
            f"\n## Replica start-up delay {args.extra_startup_seconds:g} s\n\n"
            "The paper assumed replicas start instantly (every GPU preloads both models); here "
            "a new replica serves only after the delay.\n" + table(extras_main, order)
        )
    print(body)
    print(checks)
    print(extra_body)
    if args.no_write:
        return 0
    command = "python bench/sim_compare.py" + (" " + " ".join(argv) if argv else "")
    report = (
        "# Simulator: every policy on the MAF traces\n\n"
        f"Cascade `{args.scenario}`, SLO {args.slo_seconds:g} s, dispatch {args.dispatch}, "
        f"replica start-up {args.startup_seconds if args.startup_seconds is not None else 0:g} s"
        f". Command: `{command}` ({total:.0f} s for all runs on {platform.machine()}, "
        f"Python {platform.python_version()}).\n" + body + "\n## Targets\n\n" + checks + extra_body
    )
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    (results / "sim_compare.json").write_text(
        json.dumps({"main": rows, "extras": extras}, indent=1) + "\n"
    )
    existing = BENCH / "RESULTS-simulator.md"
    notes = ""
    if existing.is_file():
        text = existing.read_text()
        marker = "\n## Reading the results"
        if marker in text:
            notes = text[text.index(marker) :]
    existing.write_text(report + notes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
