"""Every query of the chart's Grafana dashboard returns data from a real Prometheus scraping
real tiny workers and the unmodified operator's `--metrics-port` (Kopf against kmock).

The dashboard's variables are set as a user picking the cascade would ($namespace: all,
$cascade: the test's); `$__rate_interval` is Grafana's and becomes 30 s (four 1-s scrapes and
more). Emulator gap: the workers run outside any pod, so their series carry no `namespace`
label (a PodMonitor would add it); the queries match them with `namespace=~".*"` either way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from kmock_k8s import ThreadedKMock
from kube_env import (
    Cluster,
    PrometheusProcess,
    WorkerProcess,
    free_port,
    load,
    operator_env,
    wait_for,
)
from test_kube_operator import CASCADE, Operator, _plan, _setup

pytestmark = [pytest.mark.slow, pytest.mark.prometheus]

REPO = Path(__file__).resolve().parents[3]
DASHBOARD = REPO / "helm" / "diffcascade" / "dashboards" / "diffcascade.json"
VARIABLES = {"$namespace": ".*", "$cascade": CASCADE, "$__rate_interval": "30s"}


@pytest.fixture
def cluster(k8s: ThreadedKMock) -> Cluster:
    return Cluster()


def _queries() -> list[tuple[str, str, str]]:
    """(panel, legend, PromQL with the variables set) of every dashboard target."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            out.append((panel["title"], target["legendFormat"], expr))
    return out


def _result(prometheus: PrometheusProcess, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=5)
    body = answer.json()
    assert body["status"] == "success", (expr, body)
    rows: list[dict[str, Any]] = body["data"]["result"]
    return rows


def test_every_dashboard_query_returns_data_from_real_workers_and_the_operator(
    cluster: Cluster,
    workers: dict[str, WorkerProcess],
    tiny_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    if not PrometheusProcess.available():
        pytest.skip("Debian's prometheus is not installed (scripts/install-system-deps.sh)")
    ns = "dashboard"
    port = free_port()
    targets = [f"127.0.0.1:{w.port}" for w in workers.values()] + [f"127.0.0.1:{port}"]
    prometheus = PrometheusProcess(targets=targets[:-1], workdir=tmp_path)
    prometheus.targets = targets  # scraped: the workers now, the operator once it listens
    _setup(cluster, ns, tiny_models)
    env = {
        **operator_env(prometheus_url=None),
        "DIFFCASCADE_METRICS_PORT": str(port),
        "DIFFCASCADE_SLO_WINDOW_SECONDS": "12",
        "DIFFCASCADE_SLO_MIN_REQUESTS": "5",
    }
    with Operator(namespace=ns, env=env):
        wait_for(lambda: cluster.replicas(ns, f"{CASCADE}-light"), what="light Deployment")
        cluster.register_pods(ns, CASCADE, workers)
        wait_for(lambda: _plan(cluster, ns), timeout=60, what="a first plan")
        prometheus.start()
        try:
            with load(workers["light"].url, qps=2.0):
                pending = _queries()
                deadline = time.monotonic() + 90
                while pending and time.monotonic() < deadline:
                    pending = [q for q in pending if not _result(prometheus, q[2])]
                    if pending:
                        time.sleep(2)
            assert not pending, "no data for: " + "; ".join(f"{p}/{le}" for p, le, _ in pending)
            names = httpx.get(
                f"{prometheus.url}/api/v1/label/cascade/values",
                params={"match[]": 'diffcascade_plan_demand_qps{namespace=~".*"}'},
                timeout=5,
            ).json()["data"]
            assert CASCADE in names  # the $cascade variable's query
        finally:
            prometheus.stop()
