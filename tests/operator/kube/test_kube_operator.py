"""The unmodified operator (Kopf's KopfRunner) against kmock, real workers and real Prometheus.

Emulator gaps these tests work around, where they matter:
- no controllers: a Deployment never gets pods, so the test creates the Pod objects itself
  (podIP 127.0.0.1, the real worker's port, Ready) and a Deployment scaled to 2 still has 1;
- no garbage collection: deletion is checked through ownerReferences, not by deleting;
- `/api/v1/namespaces` crashes kmock, and Kopf lists namespaces when given `--namespace`:
  the operator runs with `--all-namespaces`, and each test deletes its cascade at the end;
- no admission schema validation: an invalid spec reaches the operator (a real apiserver
  would reject shape errors; cross-field rules like the GPU floor pass it either way).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from diffcascade_operator.cli import main
from diffcascade_worker.protocol import HEADER_BUDGET_MS
from kmock_k8s import ThreadedKMock
from kopf._core.intents.registries import SmartOperatorRegistry
from kopf.testing import KopfRunner
from kube_env import (
    GROUP,
    HANDLERS,
    PLURAL,
    VERSION,
    Cluster,
    PrometheusProcess,
    WorkerProcess,
    cascade_manifest,
    environment,
    load,
    operator_env,
    start_router,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

LOGS = Path(tempfile.gettempdir()) / "diffcascade-operator-tests"
CASCADE = "tiny"  # the workers' `cascade` label: every namespace's cascade has this name


class Operator:
    def __init__(self, *, namespace: str, env: dict[str, str], delete_on_exit: bool = True) -> None:
        self.namespace, self.env, self.delete_on_exit = namespace, env, delete_on_exit
        self.runner: KopfRunner | None = None

    def __enter__(self) -> Operator:
        # The handlers file reads its settings when Kopf loads it, in the runner's thread.
        self._env = environment(self.env)
        self._env.__enter__()
        self.runner = KopfRunner(
            ["run", "--standalone", "--all-namespaces", str(HANDLERS)],
            timeout=60,
            # A fresh registry (with Kopf's default login) per run: with the shared default one,
            # every earlier run's handlers would run too.
            registry=SmartOperatorRegistry(),
        )
        self.runner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.runner is not None
        try:
            if self.delete_on_exit:
                # The operator runs cluster-wide (see the module doc): remove this test's
                # cascade while it runs (it holds Kopf's finalizer) so no later operator sees it.
                Cluster().delete_cascade(self.namespace, CASCADE)
        finally:
            self.runner.__exit__(*exc)
            self._env.__exit__(None, None, None)
        LOGS.mkdir(exist_ok=True)
        (LOGS / f"operator-{self.namespace}-{time.time():.0f}.log").write_text(self.runner.output)
        # Kopf swaps stdout while it runs: its log is only readable now.
        if self.runner.exception is not None:
            raise self.runner.exception


@pytest.fixture
def cluster(k8s: ThreadedKMock) -> Cluster:
    return Cluster()


def _setup(cluster: Cluster, namespace: str, models: dict[str, Path]) -> dict[str, Any]:
    cluster.create_cascade(namespace, cascade_manifest(CASCADE, models=models))
    cluster.create_token_secret(namespace, CASCADE)
    return cluster.cascade(namespace, CASCADE)


def _plan(cluster: Cluster, namespace: str) -> dict[str, Any] | None:
    allocation = cluster.status(namespace, CASCADE).get("allocation")
    return allocation if allocation and allocation.get("variants") else None


def test_demand_increase_scales_deployment_and_pushes_threshold(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
) -> None:
    ns = "demand"
    _setup(cluster, ns, tiny_models)
    with Operator(namespace=ns, env=operator_env(prometheus_url=prometheus.url)):
        wait_for(lambda: cluster.replicas(ns, f"{CASCADE}-light"), what="light Deployment")
        cluster.register_pods(ns, CASCADE, workers)
        first = wait_for(lambda: _plan(cluster, ns), timeout=60, what="a first plan")
        light_before = cluster.replicas(ns, f"{CASCADE}-light")
        threshold_before = first["threshold"]
        wait_for(
            lambda: abs(workers["light"].config()["threshold"] - threshold_before) < 1e-6,
            what="the first plan's threshold on the light worker",
        )
        with load(workers["light"].url, qps=4.0):

            def reacted() -> dict[str, Any] | None:
                plan = _plan(cluster, ns)
                if (
                    plan is None
                    or (cluster.replicas(ns, f"{CASCADE}-light") or 0) <= (light_before or 0)
                    or plan["threshold"] == threshold_before
                ):
                    return None
                pushed = workers["light"].config()["threshold"]
                return plan if abs(pushed - plan["threshold"]) < 1e-6 else None

            after = wait_for(reacted, timeout=90, what="more light replicas, a new threshold")
        status = cluster.status(ns, CASCADE)
        events = cluster.events(ns, "PlanChanged")
    assert after["threshold"] < threshold_before  # more load: defer less
    metrics = next(c for c in status["conditions"] if c["type"] == "MetricsAvailable")
    assert status["demand"]["source"] == "Prometheus", metrics
    assert status["demand"]["qps"] > 1.0
    assert events, "a plan change posts an Event"
    assert workers["light"].config()["plan_id"] == after["planId"]


def test_the_operator_runs_the_router_and_pushes_it_each_plan(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    ns = "router"
    stages = [f"http://{CASCADE}-{v}.{ns}.svc:8000" for v in ("light", "heavy")]
    router = start_router(tmp_path, allowed=stages)
    try:
        _setup(cluster, ns, tiny_models)
        with Operator(namespace=ns, env=operator_env(prometheus_url=prometheus.url)):
            wait_for(lambda: cluster.replicas(ns, CASCADE), what="the router Deployment")
            cluster.register_pods(ns, CASCADE, workers)
            cluster.register_router_pod(ns, CASCADE, router.port)
            wait_for(lambda: _plan(cluster, ns), timeout=60, what="a first plan")

            def holds_the_current_plan() -> dict[str, Any] | None:
                # The current one: a newer plan may replace the first before its push lands.
                config = router.config() or {}
                current = _plan(cluster, ns) or {}
                return config if config.get("plan_id") == current.get("planId") else None

            held = wait_for(
                holds_the_current_plan,
                timeout=30,
                what="the plan's router document on the router pod",
            )
            service = cluster.core.read_namespaced_service(CASCADE, ns)
    finally:
        router.stop()
    assert held["entry_url"] == stages[0] and held["heavy_url"] == stages[1]
    assert held["router_share"] == 0.0  # no quality table: everything through the gate
    assert service.spec.selector == {
        "diffcascade.dev/cascade": CASCADE,
        "diffcascade.dev/role": "router",
    }


def test_a_table_whose_plan_enters_past_the_first_variant_routes_through_the_router(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A quality table whose best row is (mid -> heavy, r = 0.5): the plan enters at the
    second variant, and the router pods are told that entry, the heavy stage and r."""
    ns = "hybrid"
    manifest = cascade_manifest(CASCADE, models=tiny_models, gpu_budget=4)
    light, heavy = manifest["spec"]["variants"]
    mid = {**copy.deepcopy(light), "name": "mid", "minReplicas": 0}
    manifest["spec"]["variants"] = [{**light, "minReplicas": 0}, mid, heavy]
    manifest["spec"]["qualityTable"] = {
        "rows": [
            {"light": "light", "heavy": "mid", "routerShare": 0, "escalateShare": 0.5, "fid": 30},
            {"light": "mid", "heavy": "heavy", "routerShare": 0.5, "escalateShare": 0, "fid": 10},
        ]
    }
    manifest["spec"]["router"] = {"scorer": "learned", "explorationShare": 0.1}
    stages = [f"http://{CASCADE}-{v}.{ns}.svc:8000" for v in ("light", "mid", "heavy")]
    router = start_router(tmp_path, allowed=stages)
    try:
        cluster.create_cascade(ns, manifest)
        cluster.create_token_secret(ns, CASCADE)
        with Operator(namespace=ns, env=operator_env(prometheus_url=prometheus.url)):
            wait_for(lambda: cluster.replicas(ns, CASCADE), what="the router Deployment")
            cluster.register_pods(ns, CASCADE, workers)
            cluster.register_router_pod(ns, CASCADE, router.port)
            plan = wait_for(
                lambda: (p := _plan(cluster, ns)) and p.get("entryStage") == "mid" and p,
                timeout=60,
                what="a plan entering at mid",
            )
            held = wait_for(
                lambda: (
                    (router.config() or {}).get("plan_id") == plan["planId"] and router.config()
                ),
                timeout=30,
                what="the plan's router document on the router pod",
            )
    finally:
        router.stop()
    assert plan["pair"] == "mid->heavy" and plan["routerShare"] == 0.5
    assert plan["row"]["fid"] == 10 and plan["predictedFID"] == 10
    assert held["entry_variant"] == "mid" and held["entry_url"] == stages[1]
    assert held["heavy_variant"] == "heavy" and held["heavy_url"] == stages[2]
    assert held["router_share"] == 0.5
    assert held["scorer"] == "learned" and held["exploration_share"] == 0.1


def _kubectl(*args: str) -> str:
    exe = Path(sys.executable).with_name("kubectl")
    binary = str(exe) if exe.exists() else shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed")
    cache = Path(tempfile.gettempdir()) / "diffcascade-kubectl-cache"
    done = subprocess.run(
        [binary, f"--cache-dir={cache}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _columns(table: str) -> list[dict[str, str]]:
    """Rows of kubectl's table, cut at the header's column starts (cells may hold spaces)."""
    lines = [line for line in table.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def test_kubectl_get_dcas_prints_the_printer_columns(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    ns = "cli"
    manifest = cascade_manifest(CASCADE, models=tiny_models)
    manifest["metadata"]["namespace"] = ns
    (tmp_path / "cascade.yaml").write_text(json.dumps(manifest))
    _kubectl("apply", "--validate=false", "-f", str(tmp_path / "cascade.yaml"))
    cluster.create_token_secret(ns, CASCADE)
    with Operator(namespace=ns, env=operator_env(prometheus_url=prometheus.url)):
        wait_for(lambda: cluster.replicas(ns, f"{CASCADE}-heavy"), what="Deployments")
        cluster.register_pods(ns, CASCADE, workers)
        wait_for(
            lambda: (cluster.condition(ns, CASCADE, "Ready") or {}).get("status") == "True",
            timeout=60,
            what="Ready",
        )
        table = _kubectl("get", "dcas", "-n", ns)
        wide = _kubectl("get", "dcas", "-n", ns, "-o", "wide")
        status = cluster.status(ns, CASCADE)
    assert table.splitlines()[0].split() == [
        "NAME",
        "DEMAND",
        "PAIR",
        "ROUTER",
        "THRESHOLD",
        "REPLICAS",
        "FID",
        "MISSED",
        "READY",
        "AGE",
    ]
    row = _columns(table)[0]
    assert row["NAME"] == CASCADE
    assert row["READY"] == "True"
    assert row["REPLICAS"] == status["replicasSummary"]
    assert row["REPLICAS"].startswith("light=") and " heavy=" in row["REPLICAS"]
    assert float(row["THRESHOLD"]) == pytest.approx(status["allocation"]["threshold"], abs=1e-3)
    assert float(row["FID"]) > 0
    assert row["PAIR"] == status["allocation"]["pair"] and row["PAIR"].startswith("light")
    assert float(row["ROUTER"]) == 0.0  # no quality table: nothing is routed
    wide_row = _columns(wide)[0]
    assert wide_row["ENTRY"] == "light"
    assert wide_row["SOURCE"] in ("Prometheus", "DirectScrape")
    assert wide_row["SOLVER"] in ("Optimal", "Initial")


def _slo(cluster: Cluster, ns: str, status: str) -> dict[str, Any] | None:
    cond = cluster.condition(ns, CASCADE, "SLOMet")
    return cond if cond is not None and cond.get("status") == status else None


def _post(
    url: str, count: int, *, headers: dict[str, str] | None = None, gap_s: float = 0.1
) -> list[int]:
    codes = []
    for i in range(count):
        codes.append(
            httpx.post(
                f"{url}/v1/images/generations",
                json={"prompt": f"a lighthouse {i}", "seed": i},
                headers=headers or {},
                timeout=30,
            ).status_code
        )
        time.sleep(gap_s)
    return codes


def test_measured_misses_turn_slo_met_false_with_the_numbers_beside_the_plan(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
) -> None:
    """The entry stage drops what it cannot finish in time (a 1-ms budget per request) while
    the plan stays as it was: status.slo, SLOMet, the Event and `kubectl get` say so, beside
    what the plan promised."""
    ns = "slo"
    _setup(cluster, ns, tiny_models)
    env = {
        **operator_env(prometheus_url=prometheus.url),
        "DIFFCASCADE_SLO_WINDOW_SECONDS": "12",  # read every 3 s (a quarter window)
        "DIFFCASCADE_SLO_MIN_REQUESTS": "10",
    }
    with Operator(namespace=ns, env=env):
        wait_for(lambda: cluster.replicas(ns, f"{CASCADE}-light"), what="light Deployment")
        cluster.register_pods(ns, CASCADE, workers)
        wait_for(lambda: _plan(cluster, ns), timeout=60, what="a first plan")
        assert set(_post(workers["light"].url, 15)) == {200}
        met = wait_for(lambda: _slo(cluster, ns, "True"), timeout=60, what="SLOMet True")
        assert met["reason"] == "Met" and "requests missed the 5 s SLO" in met["message"]

        # Dropped at once, so paced: at 10 qps the demand would outgrow the two light replicas
        # and the plan would turn Infeasible, which Degraded reports before SLOMissed.
        codes = _post(workers["light"].url, 30, headers={HEADER_BUDGET_MS: "1"}, gap_s=0.4)
        assert codes.count(503) >= 15, codes  # dropped at dequeue: cannot finish in 1 ms
        missed = wait_for(lambda: _slo(cluster, ns, "False"), timeout=60, what="SLOMet False")
        print("measured:", missed["message"])
        assert missed["reason"] == "Missed" and "dropped" in missed["message"]
        status = cluster.status(ns, CASCADE)
        solver = status["allocation"]["solver"]["status"]
        assert "s SLO over 12 s" in missed["message"]
        assert f"the plan ({solver}, predicted " in missed["message"]
        slo = wait_for(
            lambda: (s := cluster.status(ns, CASCADE)["slo"]).get("refused", 0) >= 15 and s,
            timeout=30,
            what="the drops in the window",
        )
        assert slo["met"] is False and slo["violationRatio"] > 0.3
        assert slo["source"] == "Prometheus" and slo["predictedLatencySeconds"] > 0
        degraded = cluster.condition(ns, CASCADE, "Degraded")
        assert degraded is not None and degraded["reason"] == "SLOMissed"
        event = wait_for(lambda: cluster.events(ns, "SLOMissed"), what="a SLOMissed Event")
        assert event[0].type == "Warning"
        row = _columns(_kubectl("get", "dcas", "-n", ns))[0]
        assert float(row["MISSED"]) == pytest.approx(slo["violationRatio"], abs=0.2)
        printed = CliRunner().invoke(main, ["status", CASCADE, "--namespace", ns])
        assert printed.exit_code == 0, printed.output
        assert "MISSED:" in printed.output and "requests missed the" in printed.output


def test_invalid_spec_gets_a_condition_and_an_event_and_deletes_nothing(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
) -> None:
    ns = "invalid"
    body = _setup(cluster, ns, tiny_models)
    broken = cascade_manifest("broken", models=tiny_models)
    broken["spec"]["variants"][0]["gate"] = None  # a deferring stage without its curve
    with Operator(namespace=ns, env=operator_env(prometheus_url=prometheus.url)):
        cluster.create_cascade(ns, broken)
        wait_for(lambda: cluster.replicas(ns, f"{CASCADE}-light"), what="light Deployment")
        cluster.register_pods(ns, CASCADE, workers)
        wait_for(lambda: _plan(cluster, ns), timeout=60, what="a first plan")
        children_before = cluster.owned(ns, body["metadata"]["uid"])
        replicas_before = {v: cluster.replicas(ns, f"{CASCADE}-{v}") for v in ("light", "heavy")}
        cluster.patch_spec(ns, CASCADE, {"gpuBudget": 1})  # below the two minReplicas
        ready = wait_for(
            lambda: (
                (c := cluster.condition(ns, CASCADE, "Ready"))
                and c["reason"] == "InvalidSpec"
                and c
            ),
            what="Ready=False InvalidSpec",
        )
        broken_ready = wait_for(
            lambda: cluster.condition(ns, "broken", "Ready"), what="the broken cascade's Ready"
        )
        time.sleep(2)  # a few control ticks: they must leave everything alone
        children_after = cluster.owned(ns, body["metadata"]["uid"])
        replicas_after = {v: cluster.replicas(ns, f"{CASCADE}-{v}") for v in ("light", "heavy")}
        events = cluster.events(ns, "InvalidSpec")
        broken_children = cluster.owned(ns, cluster.cascade(ns, "broken")["metadata"]["uid"])
        cluster.delete_cascade(ns, "broken")
    assert ready["status"] == "False"
    assert "gpuBudget" in ready["message"]
    assert broken_ready["status"] == "False" and broken_ready["reason"] == "InvalidSpec"
    assert "gate.deferCurve" in broken_ready["message"]
    assert broken_children == {}
    assert children_after == children_before
    assert replicas_after == replicas_before
    assert {e.type for e in events} == {"Warning"}
    assert any("gpuBudget" in e.message for e in events)


def test_operator_restart_converges_without_duplicate_children(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
) -> None:
    ns = "restart"
    body = _setup(cluster, ns, tiny_models)
    uid = body["metadata"]["uid"]
    env = operator_env(prometheus_url=prometheus.url)
    with Operator(namespace=ns, env=env, delete_on_exit=False):
        wait_for(lambda: cluster.replicas(ns, f"{CASCADE}-light"), what="light Deployment")
        cluster.register_pods(ns, CASCADE, workers)
        first = wait_for(lambda: _plan(cluster, ns), timeout=60, what="a first plan")
    children = cluster.owned(ns, uid)
    uids = _child_uids(cluster, ns)
    replicas = {v: cluster.replicas(ns, f"{CASCADE}-{v}") for v in ("light", "heavy")}
    # Mark the status, so the second operator's first control step is visible.
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, CASCADE, {"status": {"readySummary": "stale"}}
    )
    with Operator(namespace=ns, env=env):
        wait_for(
            lambda: cluster.status(ns, CASCADE).get("readySummary") not in (None, "stale"),
            timeout=60,
            what="a control step of the restarted operator",
        )
        second = _plan(cluster, ns)
        created = cluster.events(ns, "ChildrenCreated")
        children_after = cluster.owned(ns, uid)
        uids_after = _child_uids(cluster, ns)
        replicas_after = {v: cluster.replicas(ns, f"{CASCADE}-{v}") for v in ("light", "heavy")}
    assert sorted(children) == ["ConfigMap", "Deployment", "Secret", "Service"]
    # The two stages and the router (`tiny`: the cascade's one stable Service and Deployment).
    assert sorted(children["Deployment"]) == [CASCADE, f"{CASCADE}-heavy", f"{CASCADE}-light"]
    assert CASCADE in children["Service"]
    assert children_after == children
    assert uids_after == uids  # patched in place, nothing re-created
    assert replicas_after == replicas
    assert len(created) == 1  # only the first operator created children
    assert second is not None
    keys = ("name", "replicas", "batchSize", "threshold")
    assert [{k: v.get(k) for k in keys} for v in second["variants"]] == [
        {k: v.get(k) for k in keys} for v in first["variants"]
    ]


def _child_uids(cluster: Cluster, ns: str) -> dict[str, str]:
    out = {
        f"Deployment/{d.metadata.name}": d.metadata.uid
        for d in cluster.apps.list_namespaced_deployment(ns).items
    }
    out.update(
        {
            f"Service/{s.metadata.name}": s.metadata.uid
            for s in cluster.core.list_namespaced_service(ns).items
        }
    )
    out.update(
        {
            f"Secret/{s.metadata.name}": s.metadata.uid
            for s in cluster.core.list_namespaced_secret(ns).items
        }
    )
    return out


def test_prometheus_down_turns_metrics_unavailable_and_keeps_the_plan(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    prometheus: PrometheusProcess,
    tiny_models: dict[str, Path],
) -> None:
    ns = "promdown"
    _setup(cluster, ns, tiny_models)
    env = operator_env(prometheus_url=prometheus.url, scrape_fallback=False)
    try:
        with Operator(namespace=ns, env=env):
            wait_for(lambda: cluster.replicas(ns, f"{CASCADE}-light"), what="light Deployment")
            cluster.register_pods(ns, CASCADE, workers)
            wait_for(
                lambda: (
                    (cluster.condition(ns, CASCADE, "MetricsAvailable") or {}).get("reason")
                    == "Prometheus"
                ),
                timeout=60,
                what="MetricsAvailable from Prometheus",
            )
            plan = _plan(cluster, ns)
            replicas = {v: cluster.replicas(ns, f"{CASCADE}-{v}") for v in ("light", "heavy")}
            prometheus.stop()
            metrics = wait_for(
                lambda: (
                    (c := cluster.condition(ns, CASCADE, "MetricsAvailable"))
                    and c["status"] == "False"
                    and c
                ),
                timeout=60,
                what="MetricsAvailable=False",
            )
            time.sleep(3)  # several control intervals without metrics
            held = _plan(cluster, ns)
            replicas_held = {v: cluster.replicas(ns, f"{CASCADE}-{v}") for v in ("light", "heavy")}
            warnings = cluster.events(ns, "MetricsUnavailable")
            status = cluster.status(ns, CASCADE)
    finally:
        if prometheus.process is None:
            prometheus.start()
    assert plan is not None and held is not None
    assert metrics["reason"] == "MetricsUnavailable"
    assert held["planId"] == plan["planId"]
    assert held["variants"] == plan["variants"] or [
        (v["name"], v["replicas"]) for v in held["variants"]
    ] == [(v["name"], v["replicas"]) for v in plan["variants"]]
    assert held["solver"]["status"] == "Held"
    assert replicas_held == replicas
    assert status["demand"]["source"] == "None"
    assert warnings and warnings[0].type == "Warning"
