"""Soak: the chaos cascade under Poisson load for 10 minutes, with a fault every minute.

    python bench/soak.py [--duration 600] [--qps 1.5] [--out bench/results/soak.json]

A light + heavy cascade of the tiny CPU models runs under `diffcascade up`; the load goes
through its router. Every `--fault-every` seconds one fault from the chaos suite hits it in
turn (1,000 idle connections at the light worker, oversized and malformed bodies plus bad
configs, the heavy worker stopped for 20 s, the heavy worker killed, 130 clients pipelining
requests they never read at the light worker, 1,000 idle connections and a 64 MB body at the
router, clients hanging up through the router, the light worker stopped for 8 s). Reports
requests, errors by kind, p50/p99 per minute and overall, and the RSS of every process over
time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "reliability"))

from chaos import (  # noqa: E402 - the harness lives with the chaos suite
    Load,
    Up,
    bad_bodies,
    bad_configs,
    big_body,
    hang_ups,
    heavy_serves,
    idle_flood,
    outcomes,
    pipelining_nonreaders,
    probe,
    rss_mb,
    running_cascade,
    summary,
    wait_for,
    worker_token,
)


async def _heavy_back(up: Up, seed: int, timeout_s: float) -> float | None:
    async def twice() -> bool:
        return await heavy_serves(up.url, seed=seed) and await heavy_serves(up.url, seed=seed + 1)

    return await wait_for(twice, timeout_s=timeout_s)


FAULTS = (
    "flood",
    "nonreaders",
    "bad-input",
    "router-flood",
    "stop-heavy",
    "hang-ups",
    "stop-light",
    "kill-heavy",
)


async def _fault(up: Up, index: int) -> dict[str, Any]:
    kind = FAULTS[index % len(FAULTS)]
    light = up.worker("light")
    record: dict[str, Any] = {"fault": kind}
    if kind == "flood":
        with idle_flood(light.port, 1000):
            await asyncio.sleep(1)
            record["healthz"] = await probe(light.url, "/healthz", 5)
            record["readyz"] = await probe(light.url, "/readyz", 5)
            await asyncio.sleep(9)
    elif kind == "bad-input":
        record["bodies"] = await bad_bodies(up.url)
        record["configs"] = await bad_configs(light.url, worker_token(light.pid))
    elif kind == "stop-heavy":
        heavy = up.worker("heavy")
        os.kill(heavy.pid, signal.SIGSTOP)
        await asyncio.sleep(20)
        os.kill(heavy.pid, signal.SIGCONT)
        record["deferrals_back_after_s"] = await _heavy_back(up, 10_000 + index, 60)
    elif kind == "nonreaders":
        with pipelining_nonreaders(light.port, 130, 400):
            await asyncio.sleep(2)
            record["healthz"] = await probe(light.url, "/healthz", 5)
            record["readyz"] = await probe(light.url, "/readyz", 5)
    elif kind == "router-flood":
        with idle_flood(up.port, 1000):
            await asyncio.sleep(1)
            record["router_healthz"] = await probe(up.url, "/healthz", 5)
        record["body_64mb"] = list(await big_body(up.url, 64))[:2]
    elif kind == "hang-ups":
        heavy = up.worker("heavy")
        before = outcomes(heavy.url)["abandoned"]
        await hang_ups(up.url, 8, after_s=0.2, body={"prompt": "x", "model": "heavy"})
        await asyncio.sleep(3)
        record["heavy_abandoned_of_8"] = outcomes(heavy.url)["abandoned"] - before
    elif kind == "stop-light":
        os.kill(light.pid, signal.SIGSTOP)
        await asyncio.sleep(8)
        os.kill(light.pid, signal.SIGCONT)
        record["light_back_after_s"] = await wait_for(
            lambda: any(w.pid == light.pid for w in up.workers("light")), timeout_s=30
        )
    else:
        heavy = up.worker("heavy")
        os.kill(heavy.pid, signal.SIGKILL)
        started = time.monotonic()
        await wait_for(lambda: any(w.pid != heavy.pid for w in up.workers("heavy")), timeout_s=180)
        back = await _heavy_back(up, 20_000 + index, 60)
        record["deferrals_back_after_s"] = (
            None if back is None else round(time.monotonic() - started, 1)
        )
    return record


def _rss(up: Up) -> dict[str, float]:
    sizes = {"up": rss_mb(up.proc.pid)}
    for variant in ("light", "heavy"):
        for i, worker in enumerate(up.workers(variant, ready_only=False)):
            sizes[f"{variant}-{i}"] = round(rss_mb(worker.pid), 1)
    for child in psutil.Process(up.proc.pid).children():
        if "prometheus" in " ".join(child.cmdline()):
            sizes["prometheus"] = round(rss_mb(child.pid), 1)
    sizes["up"] = round(sizes["up"], 1)
    return sizes


async def soak(up: Up, *, duration_s: float, qps: float, fault_every_s: float) -> dict[str, Any]:
    load = Load(url=up.url, qps=qps, slo_seconds=3.0, max_in_flight=48)
    started = time.monotonic()
    load_task = asyncio.create_task(load.run(duration_s))
    faults: list[dict[str, Any]] = []
    rss: list[dict[str, Any]] = []
    next_fault, next_sample, index = fault_every_s, 0.0, 0
    while not load_task.done():
        now = time.monotonic() - started
        if now >= next_sample:
            rss.append({"t_s": round(now), **_rss(up)})
            next_sample += 15.0
        if now >= next_fault and now < duration_s - 30:
            fault = await _fault(up, index)
            fault["at_s"] = round(now)
            faults.append(fault)
            print("fault", fault, flush=True)
            index += 1
            next_fault += fault_every_s
        await asyncio.sleep(1.0)
    await load_task
    rss.append({"t_s": round(time.monotonic() - started), **_rss(up)})
    minutes = [
        {"minute": m, **summary(load.between(60.0 * m, 60.0 * (m + 1)))}
        for m in range(int(duration_s // 60) + 1)
    ]
    return {
        "duration_s": duration_s,
        "qps": qps,
        "overall": summary(load.results),
        "skipped_at_max_in_flight": load.skipped,
        "late_past_slo_plus_3s": sum(r.latency_s > 6.0 for r in load.results),
        "per_minute": [m for m in minutes if m["requests"]],
        "faults": faults,
        "rss_mb": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--qps", type=float, default=1.5)
    parser.add_argument("--fault-every", type=float, default=60.0)
    parser.add_argument("--models", type=Path, default=None, help="tiny models (built if absent)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        models = args.models or Path(tmp) / "models"
        if not (models / "light").exists():
            from diffcascade_worker.models.tiny import make_tiny_model

            for kind in ("light", "heavy"):
                make_tiny_model(kind, models / kind)
        paths = {"light": models / "light", "heavy": models / "heavy"}
        with running_cascade(paths, Path(tmp)) as up:
            result = asyncio.run(
                soak(up, duration_s=args.duration, qps=args.qps, fault_every_s=args.fault_every)
            )
        result["exit_code_of_up"] = up.proc.returncode
        result["processes_left"] = up.survivors()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("overall", "faults", "processes_left")}, indent=2))


if __name__ == "__main__":
    main()
