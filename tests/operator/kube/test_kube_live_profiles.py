"""ProfileDrift end to end: the unmodified operator under kmock, a real Prometheus scraping real
tiny workers, and prompts that turn hard mid-test.

The tiny light model's deferral curve was calibrated on 64 known prompts and seeds (see
`diffcascade_worker.models.tiny`). Sending exactly those first gives a live curve equal to the
profile; then only the quarter the gate liked least ("the prompt file is switched") pulls the live
curve away until the operator says so in the ProfileDrift condition, an Event, status.profiles
and `diffcascade status`.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from diffcascade_operator.cli import main
from diffcascade_worker.models.tiny import tiny_prompts
from kmock_k8s import ThreadedKMock
from kube_env import Cluster, PrometheusProcess, WorkerProcess, operator_env, wait_for
from test_kube_operator import CASCADE, Operator, _setup

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

#: How `make_tiny_model` calibrates the light gate (seed 0): prompts and seeds.
CALIBRATION_OFFSET = 32
WINDOW_S = 30
DRIFT = 0.2
LIVE_ENV = {
    "DIFFCASCADE_LIVE_WINDOW_SECONDS": str(WINDOW_S),
    "DIFFCASCADE_LIVE_MIN_SAMPLES": "8",
    "DIFFCASCADE_DRIFT_MIN_SAMPLES": "24",
    "DIFFCASCADE_DRIFT_DISTANCE": str(DRIFT),
}


@pytest.fixture
def cluster(k8s: ThreadedKMock) -> Cluster:
    return Cluster()


def _calibration(models: dict[str, Path]) -> list[tuple[str, int, float]]:
    """(prompt, seed, confidence) of every calibration prompt, in calibration order."""
    doc = json.loads((models["light"] / "defer_curve.json").read_text())
    confidences = doc["confidences"]
    prompts = tiny_prompts(len(confidences), offset=CALIBRATION_OFFSET)
    return [
        (p, CALIBRATION_OFFSET + i, c)
        for i, (p, c) in enumerate(zip(prompts, confidences, strict=True))
    ]


def _send(url: str, requests: list[tuple[str, int]], *, qps: float) -> dict[int, int]:
    """Open-loop POSTs at `qps` (bounded by the list); status code counts."""
    codes: dict[int, int] = {}

    def one(prompt: str, seed: int) -> int:
        try:
            return httpx.post(
                f"{url}/v1/images/generations",
                json={"prompt": prompt, "size": "64x64", "seed": seed},
                timeout=30,
            ).status_code
        except httpx.HTTPError:
            return 0

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = []
        for i, (prompt, seed) in enumerate(requests):
            delay = start + i / qps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, prompt, seed))
        for future in futures:
            code = future.result()
            codes[code] = codes.get(code, 0) + 1
    return codes


def _drift(cluster: Cluster, ns: str, status: str) -> dict[str, Any] | None:
    cond = cluster.condition(ns, CASCADE, "ProfileDrift")
    return cond if cond is not None and cond.get("status") == status else None


def test_prompts_turning_hard_raise_profile_drift_with_event_and_status(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
) -> None:
    ns = "drift"
    calibration = _calibration(tiny_models)
    hardest = sorted(calibration, key=lambda row: row[2])[: len(calibration) // 4]
    _setup(cluster, ns, tiny_models)
    env = {**operator_env(prometheus_url=prometheus.url), **LIVE_ENV}
    with Operator(namespace=ns, env=env):
        wait_for(lambda: cluster.replicas(ns, f"{CASCADE}-light"), what="light Deployment")
        cluster.register_pods(ns, CASCADE, workers)
        wait_for(
            lambda: cluster.condition(ns, CASCADE, "ProfileDrift"),
            timeout=60,
            what="a ProfileDrift condition",
        )

        # The calibration prompts themselves: the live curve is the profile.
        codes = _send(workers["light"].url, [(p, s) for p, s, _ in calibration], qps=3.0)
        assert codes.get(200, 0) >= len(calibration) * 0.9, codes
        calm = wait_for(lambda: _drift(cluster, ns, "False"), timeout=30, what="ProfileDrift False")
        assert calm["reason"] == "WithinProfile" and f"{WINDOW_S} s window" in calm["message"]
        # The figures for the record: Kopf holds stdout, so they land in the operator's log.
        print("calibration prompts:", calm["message"])
        profiles = cluster.status(ns, CASCADE)["profiles"]
        assert profiles["source"] == "Prometheus" and profiles["windowSeconds"] == WINDOW_S
        light = profiles["variants"][0]
        assert light["name"] == "light" and light["samples"] >= 24
        assert light["maxDistance"] <= DRIFT and "fLive" in light and "fProfile" in light

        # The prompt file is switched: only the hardest quarter, until the operator notices.
        drifted: dict[str, Any] | None = None
        deadline = time.monotonic() + 90
        while drifted is None and time.monotonic() < deadline:
            _send(workers["light"].url, [(p, s) for p, s, _ in hardest], qps=4.0)
            drifted = _drift(cluster, ns, "True")
        drifted = drifted or wait_for(
            lambda: _drift(cluster, ns, "True"), timeout=10, what="ProfileDrift True"
        )
        assert drifted["reason"] == "CurveDrifted"
        print("hardest prompts:", drifted["message"])
        assert (
            f"{WINDOW_S} s window" in drifted["message"] and f"> {DRIFT:.3f}" in drifted["message"]
        )
        events = wait_for(lambda: cluster.events(ns, "ProfileDrift"), what="a ProfileDrift Event")
        assert events[0].type == "Warning" and "departs from the profile" in events[0].message
        status = cluster.status(ns, CASCADE)["profiles"]
        assert status["drift"] is True and status["maxDistance"] > DRIFT
        light = status["variants"][0]
        assert light["fLive"] is not None and light["weight"] > 0

        printed = CliRunner().invoke(main, ["status", CASCADE, "--namespace", ns])
        assert printed.exit_code == 0, printed.output
        assert "profiles" in printed.output and "DRIFT" in printed.output
        assert "ProfileDrift" in printed.output
