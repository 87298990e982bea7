"""Applying a plan: deletion cost before scale-down, config PUTs once per plan, replicas."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from diffcascade_operator.kube.actuator import PodInfo, apply_plan, deletion_costs
from diffcascade_operator.kube.api import KubeApi
from diffcascade_operator.kube.manifests import DELETION_COST, plan_id
from kmock_k8s import ThreadedKMock
from kube_env import Cluster, adopted
from test_kube_manifests import _children, _plan, _spec


class Pod:
    """A worker's /metrics (queue depth) and /v1/cascade/config (records PUTs), over HTTP."""

    def __init__(self, queue: int) -> None:
        self.puts: list[dict[str, Any]] = []
        pod = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (
                    f'diffcascade_queue_depth{{cascade="c",variant="light"}} {queue}\n'
                    f'diffcascade_inflight_requests{{cascade="c",variant="light"}} 0\n'
                ).encode()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                length = int(self.headers["Content-Length"])
                pod.puts.append(json.loads(self.rfile.read(length)))
                pod.auth = self.headers.get("Authorization")
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.auth: str | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def pods() -> Iterator[dict[str, Pod]]:
    running = {"busy": Pod(queue=5), "idle": Pod(queue=0)}
    yield running
    for pod in running.values():
        pod.server.shutdown()


def test_scale_down_marks_the_idlest_pod_cheapest_and_config_is_pushed_once(
    k8s: ThreadedKMock, pods: dict[str, Pod]
) -> None:
    api, cluster, ns = KubeApi(), Cluster(), "actuate"
    for child in adopted(_children(_plan(2, 1, 0.1)).values(), namespace=ns):
        api.apply(child)
    infos = []
    for name, pod in pods.items():
        cluster.core.create_namespaced_pod(
            ns, {"metadata": {"name": name}, "spec": {"containers": [{"name": "w"}]}}
        )
        infos.append(PodInfo(name, f"uid-{name}", "light", "127.0.0.1", pod.port, ready=True))
    plan = _plan(1, 1, 0.05)
    acknowledged: dict[str, str] = {}

    def apply(current: dict[str, int | None]) -> Any:
        return apply_plan(
            api=api,
            namespace=ns,
            cascade="c",
            spec=_spec(),
            plan=plan,
            current_replicas=current,
            pods=infos,
            token="t0k",
            acknowledged=acknowledged,
            configmap_plan_id=None,
            timeout_s=2.0,
            port=8000,
        )

    result = apply({"light": 2, "heavy": 1})
    again = apply({"light": 1, "heavy": 1})

    costs = {
        name: int(cluster.core.read_namespaced_pod(name, ns).metadata.annotations[DELETION_COST])
        for name in pods
    }
    assert costs["idle"] < costs["busy"]
    assert cluster.replicas(ns, "c-light") == 1
    assert result.scaled == {"light": (2, 1)}
    assert result.pushed_ok == 2 and result.acknowledged == 2 and not result.push_failures
    assert again.pushed_ok == 0 and again.acknowledged == 2  # nothing new to say
    assert pods["idle"].puts == [
        {
            "threshold": 0.05,
            "batch_size": 1,
            "max_batch_wait_ms": 0.0,
            "slo_seconds": 5.0,
            "plan_id": plan_id(plan),
        }
    ]
    assert pods["busy"].auth == "Bearer t0k"
    cm = cluster.core.read_namespaced_config_map("c-plan", ns)
    assert cm.data["light.threshold"] == "0.05"


def test_unanswering_pods_cost_least_and_fail_the_push() -> None:
    assert deletion_costs({"a": 2.0, "b": 0.0, "c": None}) == {"a": "200", "b": "0", "c": "-1"}


@pytest.fixture
def router_process(tmp_path: Any) -> Iterator[str]:
    """A real `diffcascade-worker route` (what the router Deployment runs), on loopback."""
    import subprocess
    import sys
    import time

    import httpx
    from diffcascade_worker.protocol import PATH_HEALTHZ
    from kube_env import free_port

    port = free_port()
    stages = ["http://c-light.ns.svc:8000", "http://c-heavy.ns.svc:8000"]
    log = (tmp_path / "router.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from diffcascade_worker.cli import main; main()",
            "route",
            "--port",
            str(port),
            "--token",
            "t0k",
            "--log-level",
            "warning",
            *(arg for url in stages for arg in ("--allowed-stage", url)),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                if httpx.get(url + PATH_HEALTHZ, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_router_pods_get_the_plans_router_document_once(
    k8s: ThreadedKMock, router_process: str
) -> None:
    import httpx
    from diffcascade_operator.kube import manifests
    from diffcascade_operator.kube.settings import OperatorSettings
    from diffcascade_worker.protocol import PATH_READYZ, PATH_ROUTER_CONFIG

    api, ns = KubeApi(), "actuate-router"
    settings = OperatorSettings()
    plan = _plan(1, 1, 0.05)
    router = manifests.router_document(
        cascade="c", namespace="ns", plan=plan, spec=_spec(), settings=settings
    )
    assert router is not None
    port = int(router_process.rsplit(":", 1)[1])
    info = PodInfo("c-router-0", "uid-r", "", "127.0.0.1", port, ready=True, role="router")
    acknowledged: dict[str, str] = {}
    assert httpx.get(router_process + PATH_READYZ).status_code == 503  # no plan yet

    def apply() -> Any:
        return apply_plan(
            api=api,
            namespace=ns,
            cascade="c",
            spec=_spec(),
            plan=plan,
            current_replicas={"light": 1, "heavy": 1},
            pods=[info],
            token="t0k",
            acknowledged=acknowledged,
            configmap_plan_id=plan_id(plan),
            timeout_s=3.0,
            port=8000,
            router=router,
        )

    first, again = apply(), apply()
    held = httpx.get(
        router_process + PATH_ROUTER_CONFIG, headers={"Authorization": "Bearer t0k"}
    ).json()
    assert first.routers_serving == 1 and first.routers_acknowledged == 1
    assert first.pushed_ok == 1 and not first.push_failures
    assert again.pushed_ok == 0 and again.routers_acknowledged == 1  # nothing new to say
    assert held["entry_variant"] == "light" and held["heavy_variant"] == "heavy"
    assert held["entry_url"] == "http://c-light.ns.svc:8000"
    assert held["router_share"] == 0.0 and held["plan_id"] == plan_id(plan)
    assert httpx.get(router_process + PATH_READYZ).status_code == 200
