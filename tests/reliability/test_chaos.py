"""Chaos: a light + heavy cascade under `diffcascade up` keeps its promises through faults.

One run (about 1.5-2 minutes on 2 cores): Poisson load at 1.5 qps through the router while the
suite floods the light worker with 1,000 idle connections and with clients that pipeline
requests and never read, floods the router with 1,000 idle connections and a 64 MB body,
sends oversized and malformed bodies, pushes bad configs, hangs clients up through the router
(plain and streamed), stops the light worker for 8 s, stops the heavy worker for 20 s and
kills it. Stated bounds:

- every request gets a 200 or a documented error in the OpenAI envelope (no 500, no plain
  text) and none takes longer than its SLO + `LATE_MARGIN_S`;
- probes answer under the floods, the worker's and the router's; the workers' and `up`'s
  memory stays within `RSS_GROWTH_MB` of the start;
- a client that hangs up through the router is counted abandoned by the stage working for it;
- a stopped light worker leaves the router (requests get 503 at once) within
  `RECOVER_UNREADY_S` of SIGSTOP, and is back within as long of SIGCONT;
- deferrals are served by the heavy stage again within `RECOVER_STOP_S` of SIGCONT and within
  `RECOVER_KILL_S` of SIGKILL (a new heavy process must start);
- after Ctrl-C no process `up` started is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from chaos import (
    Load,
    Up,
    bad_bodies,
    bad_configs,
    big_body,
    closed_count,
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
from diffcascade_operator.local.runner import EXIT_INTERRUPTED

pytestmark = pytest.mark.slow

SLO_S = 3.0
LATE_MARGIN_S = 3.0  # router + loaded-machine slack past the SLO
RSS_GROWTH_MB = 150.0
RECOVER_STOP_S = 15.0
RECOVER_KILL_S = 120.0
#: Two failed 1-s probes, the state document's 2-s update, polling, a loaded machine.
RECOVER_UNREADY_S = 8.0
FLOOD = 1000
NONREADERS = 130  # each pipelining 400 requests it never reads
HANG_UPS = 8


def _state_of(up: Up, pid: int) -> str | None:
    """The state `up` reports for the worker with `pid`."""
    for variant in ("light", "heavy"):
        for worker in up.state()["replicas"][variant]["workers"]:
            if worker["pid"] == pid:
                return str(worker["state"])
    return None


def _why(up: Up) -> str:
    """What `up` planned and saw, for a failed recovery bound (printed whole: pytest shortens
    a long assertion message)."""
    state = up.state()
    why = json.dumps(
        {
            "history": state["history"][-4:],
            "plan": state["plan"],
            "profiles": state["profiles"],
            "heavy": state["replicas"]["heavy"],
        },
        indent=1,
        default=str,
    )
    print(why)
    return why


def _deferrals_resume(light_url: str) -> Callable[[], bool]:
    """True once the light worker returns a deferred image again (the heavy stage's), from
    here on. It watches the load's own deferrals: probe requests of its own would add to the
    demand the plan answers, and a plan that defers less under it would hide the recovery."""
    start = outcomes(light_url)["deferred"]
    return lambda: outcomes(light_url)["deferred"] > start


async def _heavy_again(url: str, seed: int) -> bool:
    """Three requests in a row, at least two served by the heavy stage."""
    served = [await heavy_serves(url, seed=seed + i) for i in range(3)]
    return sum(served) >= 2


async def test_cascade_survives_floods_bad_input_a_stopped_and_a_killed_worker(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    with running_cascade(tiny_models, tmp_path, slo_seconds=SLO_S) as up:
        light, heavy = up.worker("light"), up.worker("heavy")
        rss_start = {w.pid: rss_mb(w.pid) for w in (light, heavy)}
        rss_start[up.proc.pid] = rss_mb(up.proc.pid)
        rss_peak = dict(rss_start)
        assert await wait_for(lambda: _heavy_again(up.url, 10), timeout_s=60) is not None

        load = Load(url=up.url, qps=1.5, slo_seconds=SLO_S)
        load_task = asyncio.create_task(load.run(duration_s=400))

        def sample_rss() -> None:
            for pid in rss_peak:
                rss_peak[pid] = max(rss_peak[pid], rss_mb(pid))

        # 1. a flood of idle connections at the light worker: probes still answer
        await asyncio.sleep(5)
        with idle_flood(light.port, FLOOD) as flood:
            await asyncio.sleep(1)
            health = await probe(light.url, "/healthz", 10)
            ready = await probe(light.url, "/readyz", 10)
            evicted = closed_count(flood)
            sample_rss()
        assert health == [200] * 10 and ready == [200] * 10, (health, ready)
        assert evicted >= FLOOD - 600, f"only {evicted} of {FLOOD} idle connections closed"

        # 2. oversized and malformed bodies, through the router and straight at the worker
        for target in (up.url, light.url):
            answers = await bad_bodies(target)
            assert [status for status, _ in answers] == [413, 400, 400, 400, 400], answers
        sample_rss()

        # 3. bad configs: refused, and the worker keeps its config
        token = worker_token(light.pid)
        assert await bad_configs(light.url, token) == [400, 400, 400, 400, 400, 401, 401]

        # 3b. clients that pipeline requests and never read: the probes still get in
        with pipelining_nonreaders(light.port, NONREADERS, 400):
            await asyncio.sleep(2)
            health = await probe(light.url, "/healthz", 10)
            ready = await probe(light.url, "/readyz", 10)
            sample_rss()
        assert health == [200] * 10 and ready == [200] * 10, (health, ready)

        # 3c. the router: a flood of idle connections and a 64 MB body
        with idle_flood(up.port, FLOOD):
            await asyncio.sleep(1)
            router_health = await probe(up.url, "/healthz", 10)
            sample_rss()
        assert router_health == [200] * 10, router_health
        status, code, took = await big_body(up.url, 64)
        sample_rss()
        assert (status, code) == (413, "payload_too_large") and took < 10.0, (status, code, took)

        # 3d. clients that hang up through the router: the stage drops their work
        before = outcomes(heavy.url)
        await hang_ups(up.url, HANG_UPS, after_s=0.2, body={"prompt": "x", "model": "heavy"})
        before_light = outcomes(light.url)
        streamed = {"prompt": "hard", "stream": True, "partial_images": 1, "model": "chaos"}
        await hang_ups(up.url, HANG_UPS, after_s=0, body=streamed)
        await asyncio.sleep(3)
        heavy_gone = outcomes(heavy.url)["abandoned"] - before["abandoned"]
        light_gone = outcomes(light.url)["abandoned"] - before_light["abandoned"]
        assert heavy_gone >= HANG_UPS - 2, heavy_gone  # one or two may finish first
        assert light_gone >= 1, light_gone  # streamed and deferred: cancelled, not run on

        # 3e. the light worker stopped for 8 s: out of the router at once, back after SIGCONT
        os.kill(light.pid, signal.SIGSTOP)
        try:
            out = await wait_for(
                lambda: _state_of(up, light.pid) == "unready", timeout_s=RECOVER_UNREADY_S
            )
        finally:
            await asyncio.sleep(max(0.0, 8 - (out or 0)))
            os.kill(light.pid, signal.SIGCONT)
        back = await wait_for(lambda: _state_of(up, light.pid) == "ready", timeout_s=30)
        assert out is not None and out <= RECOVER_UNREADY_S, out
        assert back is not None and back <= RECOVER_UNREADY_S, back

        # 4. the heavy worker stopped for 20 s: deferrals degrade, then come back
        os.kill(heavy.pid, signal.SIGSTOP)
        await asyncio.sleep(20)
        os.kill(heavy.pid, signal.SIGCONT)
        recovered_stop = await wait_for(_deferrals_resume(light.url), timeout_s=RECOVER_STOP_S + 30)
        sample_rss()
        assert recovered_stop is not None and recovered_stop <= RECOVER_STOP_S, (
            recovered_stop,
            _why(up),
        )

        # 5. the heavy worker killed: `up` starts another, deferrals come back
        killed_at = time.monotonic()
        os.kill(heavy.pid, signal.SIGKILL)
        replaced = await wait_for(
            lambda: any(w.pid != heavy.pid for w in up.workers("heavy")), timeout_s=RECOVER_KILL_S
        )
        assert replaced is not None, "no new heavy worker"
        back_after_kill = await wait_for(_deferrals_resume(light.url), timeout_s=60)
        assert back_after_kill is not None, _why(up)
        recovered_kill = time.monotonic() - killed_at
        assert recovered_kill <= RECOVER_KILL_S
        sample_rss()

        await asyncio.sleep(5)
        load.stop()
        await load_task
        stats = summary(load.results)
        print("chaos load:", stats, "rss start", rss_start, "peak", rss_peak)
        print(
            f"deferrals back {recovered_stop:.1f} s after SIGCONT, "
            f"{recovered_kill:.1f} s after SIGKILL"
        )

        assert stats["requests"] >= 60
        assert stats["undocumented"] == 0, [r for r in load.results if not r.documented][:5]
        late = [r for r in load.results if r.latency_s > SLO_S + LATE_MARGIN_S]
        assert not late, late[:5]
        assert stats["by_kind"].get("ok", 0) >= 0.8 * stats["requests"], stats
        for pid, start in rss_start.items():
            if pid in (light.pid, up.proc.pid):
                assert rss_peak[pid] - start <= RSS_GROWTH_MB, (rss_start, rss_peak)
    assert up.proc.returncode == EXIT_INTERRUPTED, up.output[-2000:]  # stopped by Ctrl-C
    assert up.survivors() == []
