"""Chaos for the control plane: the unmodified operator through apiserver faults and poisoned
metrics (kmock with injected faults; a real Prometheus scraping an exporter gone bad).

Stated bounds (interval 2 s, timer tick 0.5 s):
- a 409 burst on a cascade's status, and a 60-s apiserver outage (longer than Kopf's own ~54 s
  of retries) with the operator restarted in the middle of it, leave every loop running: each
  shows a new decision within `RESUME_S` of the apiserver answering again, and then follows
  the demand that rose meanwhile;
- a loop that stops stepping (a status write that hangs) turns Kopf's liveness endpoint to 500
  within the stall limit (+ Kopf's 10-s probe cache), the log names the cascade and why, and
  the probe is 200 again once the loop steps;
- a Prometheus answering 1e25 qps or a NaN queue is refused with MetricsAvailable=False and the
  plan is held; batch histograms without time are not planned with; once the metrics are sane
  the plan follows the real demand (the poison never entered the demand history).

Emulator gaps: kmock runs no controllers (Deployments get no pods; the steps see no ready
replica), no garbage collector, and answers the injected faults for watches and writes alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kmock_k8s import OBSERVER_HEADER, Fault, FaultyEmulator, ThreadedKMock
from kube_env import (
    CRD_PATH,
    Cluster,
    PrometheusProcess,
    cascade_manifest,
    operator_env,
    wait_for,
    write_kubeconfig,
)
from kube_session import KUBE_DIR, KUBECONFIG
from operator_chaos import Exporter, OperatorRun, decided_at, next_decisions, sampled

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

INTERVAL_S = 2.0
TICK_S = 0.5
#: One interval, plus Kopf's retry cadence after an error (2 s) for a restarted operator that
#: must first list the cascades again, plus the loaded machine's slack.
RESUME_S = INTERVAL_S + 2.0 + 1.5
OUTAGE_S = 60.0
LOGS = KUBE_DIR / "operator-chaos"
MODELS = {"light": Path("/models/light"), "heavy": Path("/models/heavy")}


@pytest.fixture(scope="module")
def k8s() -> Iterator[ThreadedKMock]:
    with ThreadedKMock(FaultyEmulator) as srv:
        write_kubeconfig(KUBECONFIG, srv.url)
        crd = yaml.safe_load(CRD_PATH.read_text())
        srv.call(lambda emu: emu.register_crd(crd))
        kubernetes.config.load_kube_config(config_file=str(KUBECONFIG))
        yield srv


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    with Exporter() as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(exporter: Exporter) -> Iterator[PrometheusProcess]:
    if not PrometheusProcess.available():
        pytest.skip("Debian's prometheus is not installed (scripts/install-system-deps.sh)")
    exporter.set("warmup")
    prom = PrometheusProcess(targets=[exporter.target], workdir=KUBE_DIR)
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()


def _faults(k8s: ThreadedKMock, *faults: Fault) -> None:
    k8s.emulator.faults = tuple(faults)


def _env(prometheus: PrometheusProcess, **extra: str) -> dict[str, str]:
    env = operator_env(prometheus_url=prometheus.url, scrape_fallback=False, tick=TICK_S)
    env["DIFFCASCADE_METRICS_WINDOW_SECONDS"] = "5"
    return {**env, **extra}


def _cascade(cluster: Cluster, exporter: Exporter, ns: str, name: str, qps: float = 1.0) -> None:
    exporter.set(name, mode="sane", qps=qps)
    manifest = cascade_manifest(name, models=MODELS, gpu_budget=8, interval=INTERVAL_S)
    gate = manifest["spec"]["variants"][0].setdefault("gate", {})  # keeps its discriminator
    gate["deferCurve"] = {"thresholds": [0.0, 1.0], "deferFractions": [0.0, 1.0]}
    manifest["spec"]["variants"][0]["maxReplicas"] = 6
    cluster.create_cascade(ns, manifest)


def _planned(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    allocation = cluster.status(ns, name).get("allocation") or {}
    return allocation if allocation.get("variants") else None


def _light(cluster: Cluster, ns: str, name: str) -> int:
    return cluster.replicas(ns, f"{name}-light") or 0


def test_loops_survive_a_409_burst_and_an_outage_with_a_restart_in_it(
    k8s: ThreadedKMock, exporter: Exporter, prometheus: PrometheusProcess
) -> None:
    # The test reads through the faults (the operator's requests fail, the stored state does not).
    cluster = Cluster(kubernetes.client.ApiClient(header_name=OBSERVER_HEADER, header_value="1"))
    loops = {"burst": "cb", "outage": "co", "steady": "cs"}
    figures: dict[str, Any] = {}
    with OperatorRun(_env(prometheus), log_dir=LOGS, name="faults-1") as first:
        for ns, name in loops.items():
            _cascade(cluster, exporter, ns, name)
        for ns, name in loops.items():
            wait_for(lambda ns=ns, name=name: _planned(cluster, ns, name), timeout=60)
        light_before = {ns: _light(cluster, ns, name) for ns, name in loops.items()}

        # A 2-s burst of 409s on one cascade's status (its loop used to end for good).
        exporter.set("cb", qps=20.0)
        _faults(k8s, Fault("PATCH", r"/namespaces/burst/diffusioncascades/cb/status", 409))
        time.sleep(2.0)
        seen = {("burst", "cb"): decided_at(cluster, "burst", "cb")}
        _faults(k8s)
        resumed = next_decisions(cluster, seen, started=time.monotonic(), timeout=30)
        figures["409 burst: next decision after (s)"] = resumed["burst", "cb"]
        wait_for(lambda: _light(cluster, "burst", "cb") > light_before["burst"], timeout=30)

        # 500s on everything for 60 s; the operator is restarted 10 s into it.
        exporter.set("co", qps=20.0)
        _faults(k8s, Fault("*", r"/", 500))
        outage_started = time.monotonic()
        time.sleep(10.0)
        seen_at_restart = {ns: decided_at(cluster, ns, name) for ns, name in loops.items()}
    second = OperatorRun(_env(prometheus), log_dir=LOGS, name="faults-2")
    with second:
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))
        seen_before = {ns: decided_at(cluster, ns, name) for ns, name in loops.items()}
        _faults(k8s)
        resumed = next_decisions(
            cluster,
            {(ns, name): seen_before[ns] for ns, name in loops.items()},
            started=time.monotonic(),
            timeout=60,
        )
        for (ns, _), seconds in resumed.items():
            figures[f"outage: {ns} next decision after (s)"] = seconds
        wait_for(lambda: _light(cluster, "outage", "co") > light_before["outage"], timeout=30)
        status = cluster.status("outage", "co")
        for ns, name in loops.items():
            cluster.delete_cascade(ns, name)
    (LOGS / "faults-figures.json").write_text(json.dumps(figures, indent=1))
    assert seen_before == seen_at_restart  # nothing could be written during the outage
    assert figures["409 burst: next decision after (s)"] <= RESUME_S, figures
    for ns in loops:
        assert figures[f"outage: {ns} next decision after (s)"] <= RESUME_S, figures
    assert status["demand"]["source"] == "Prometheus"
    assert {c["type"]: c["status"] for c in status["conditions"]}["MetricsAvailable"] == "True"
    assert "Timer 'control_loop' failed" not in first.output + second.output


def test_liveness_fails_naming_a_stalled_loop_and_recovers(
    k8s: ThreadedKMock, exporter: Exporter, prometheus: PrometheusProcess
) -> None:
    cluster, ns, name = Cluster(), "stall", "cstall"
    env = _env(
        prometheus,
        DIFFCASCADE_STALL_INTERVALS="2",
        DIFFCASCADE_STALL_MIN_SECONDS="0",
        DIFFCASCADE_API_TIMEOUT_SECONDS="60",
    )
    hang = Fault("PATCH", rf"/namespaces/{ns}/diffusioncascades/{name}/status", delay_s=22.0)
    with OperatorRun(env, log_dir=LOGS, name="liveness") as run:
        _cascade(cluster, exporter, ns, name)
        wait_for(lambda: _planned(cluster, ns, name), timeout=60)
        healthy_before = run.liveness()
        _faults(k8s, hang)
        with sampled(run.liveness) as probes:
            wait_for(lambda: any(code == 500 for _, code in probes), timeout=40)
            failed_at = next(t for t, code in probes if code == 500)
            _faults(k8s)  # the hung write still returns only when its delay is over
            wait_for(lambda: probes[-1][1] == 200, timeout=40)
            recovered_at = probes[-1][0]
        cluster.delete_cascade(ns, name)
    assert healthy_before == 200
    # Stalled after 2 intervals (4 s); Kopf serves a cached success for up to 10 s more.
    assert failed_at <= 4.0 + 10.0 + 3.0, probes
    assert recovered_at >= hang.delay_s - 2.0, probes
    assert f"control loop stalled: {ns}/{name}: no control step completed for" in run.output
    assert "a step has been running for" in run.output


def test_poisoned_metrics_are_refused_the_plan_held_and_real_demand_followed_after(
    k8s: ThreadedKMock, exporter: Exporter, prometheus: PrometheusProcess
) -> None:
    cluster, ns, name = Cluster(), "poison", "cpoison"
    seen: dict[str, dict[str, Any]] = {}
    # A short live window, so the histograms are read every 2 s (a quarter of it).
    env = _env(prometheus, DIFFCASCADE_LIVE_WINDOW_SECONDS="8")

    def condition(kind: str) -> dict[str, Any]:
        return cluster.condition(ns, name, kind) or {}

    def light_profile() -> dict[str, Any] | None:
        profiles = cluster.status(ns, name).get("profiles") or {}
        light = next((v for v in profiles.get("variants", ()) if v["name"] == "light"), None)
        return light if light is not None and light["batches"] >= 20 else None

    with OperatorRun(env, log_dir=LOGS, name="poison") as run:
        # Batch histograms that count batches and add no time (the solver divided by zero).
        _cascade(cluster, exporter, ns, name, qps=5.0)
        exporter.set(name, mode="zero_latency")
        seen["zero latency"] = wait_for(light_profile, timeout=60, what="a judged live latency")
        seen["zero latency solved"] = condition("AllocationSolved")
        exporter.set(name, mode="sane", qps=1.0)
        wait_for(
            lambda: condition("MetricsAvailable").get("reason") == "Prometheus",
            timeout=30,
            what="metrics from Prometheus",
        )
        replicas = _light(cluster, ns, name)
        for mode, says in (("huge", "refused: demand of"), ("nan", "queue depth of nan")):
            exporter.set(name, mode=mode)
            seen[mode] = wait_for(
                lambda says=says: (
                    (c := condition("MetricsAvailable")) and says in c.get("message", "") and c
                ),
                timeout=30,
                what=f"MetricsAvailable to say {says!r}",
            )
            time.sleep(2 * INTERVAL_S)
            seen[mode + " plan"] = _planned(cluster, ns, name) or {}
            assert _light(cluster, ns, name) == replicas  # held: nothing scaled on garbage
        exporter.set(name, mode="sane", qps=12.0)
        wait_for(lambda: _light(cluster, ns, name) > replicas, timeout=40)
        demand = cluster.status(ns, name)["demand"]
        cluster.delete_cascade(ns, name)
    assert seen["zero latency"]["latencySource"] == "profile"  # zero-time batches: no measure
    assert seen["zero latency solved"]["status"] == "True"
    for mode in ("huge", "nan"):
        assert seen[mode]["status"] == "False" and "reading refused" in seen[mode]["message"]
        assert seen[mode + " plan"]["solver"]["status"] == "Held"
    assert demand["measuredQps"] < 100  # the 1e25 samples never entered the history
    assert "Traceback" not in run.output
