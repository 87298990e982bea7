"""Real parts around the emulated API server: worker processes, Prometheus, pods, load.

Shared by the operator's tests and bench/operator_*.py. The emulator runs no controllers, so
`register_pods` creates the Pod objects a ReplicaSet would, pointing at real worker processes
on 127.0.0.1 (podIP + the container's `http` port).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import kubernetes

REPO = Path(__file__).resolve().parents[3]
CRD_PATH = REPO / "crds" / "diffusioncascade.yaml"
HANDLERS = REPO / "operator" / "diffcascade_operator" / "kube" / "handlers.py"
GROUP, VERSION, PLURAL = "diffcascade.dev", "v1alpha1", "diffusioncascades"
PROMETHEUS = "/usr/bin/prometheus"
TOKEN = "test-token"

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_kubeconfig(path: Path, url: str) -> None:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters: [{{name: kmock, cluster: {{server: '{url}'}}}}]\n"
        "users: [{name: kmock, user: {token: dummy}}]\n"
        "contexts: [{name: kmock, context: {cluster: kmock, user: kmock, namespace: default}}]\n"
        "current-context: kmock\n"
    )


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if the process has not exited within 15 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_for(fn: Callable[[], T | None], *, timeout: float = 30.0, what: str = "") -> T:
    """Poll fn until it returns something truthy (404s count as 'not yet')."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = fn()
            if result:
                return result
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
        except (KeyError, IndexError, TypeError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what or fn}")
        time.sleep(0.1)


# --- workers -----------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    variant: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        response = httpx.get(
            f"{self.url}/v1/cascade/config",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def stop(self) -> None:
        terminate(self.process)


def start_workers(
    models: Mapping[str, Path], *, cascade: str, log_dir: Path, timeout: float = 180.0
) -> dict[str, WorkerProcess]:
    """Start the heavy then light worker (light defers to heavy) and wait until both are ready."""
    ports = {"light": free_port(), "heavy": free_port()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFCASCADE_TOKEN": TOKEN}
    exe = str(Path(sys.executable).with_name("diffcascade-worker"))
    procs: dict[str, WorkerProcess] = {}
    for variant in ("heavy", "light"):
        args = [
            exe,
            "serve",
            f"--model={models[variant]}",
            f"--variant={variant}",
            f"--cascade={cascade}",
            "--host=127.0.0.1",
            f"--port={ports[variant]}",
            "--size=64",
            "--threads=1",
            "--slo-seconds=10",
            "--queue-capacity=16",
        ]
        if variant == "light":
            args += [
                f"--gate={models['light'] / 'gate.pt'}",
                f"--next-stage-url=http://127.0.0.1:{ports['heavy']}",
            ]
        log = log_dir / f"worker-{variant}-{ports[variant]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        procs[variant] = WorkerProcess(variant, ports[variant], proc, log)

    def all_ready() -> bool:
        for w in procs.values():
            if w.process.poll() is not None:
                raise RuntimeError(f"worker {w.variant} exited: {w.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{w.url}/readyz", timeout=2).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
        return True

    try:
        wait_for(all_ready, timeout=timeout, what="workers ready")
    except BaseException:
        for w in procs.values():
            w.stop()
        raise
    return procs


# --- Prometheus --------------------------------------------------------------------------------


@dataclass
class PrometheusProcess:
    targets: list[str]
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return Path(PROMETHEUS).exists() or shutil.which("prometheus") is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        config = self.workdir / f"prometheus-{self.port}.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "diffcascade-workers",
                            "scrape_interval": "1s",
                            "scrape_timeout": "900ms",
                            "static_configs": [{"targets": self.targets}],
                        }
                    ],
                }
            )
        )
        data = Path(tempfile.mkdtemp(prefix="prom-", dir=self.workdir))
        binary = PROMETHEUS if Path(PROMETHEUS).exists() else str(shutil.which("prometheus"))
        log = self.workdir / f"prometheus-{self.port}.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=timeout, what="prometheus ready")

        def scraped() -> bool:
            r = httpx.get(f"{self.url}/api/v1/query", params={"query": "sum(up)"}, timeout=2).json()
            result = r.get("data", {}).get("result", [])
            return bool(result) and float(result[0]["value"][1]) >= len(self.targets)

        wait_for(scraped, timeout=timeout, what="prometheus scraping every target")
        time.sleep(2)  # a rate needs two samples

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None


# --- objects -----------------------------------------------------------------------------------


def cascade_manifest(
    name: str, *, models: Mapping[str, Path], gpu_budget: int = 3, interval: float = 1.0
) -> dict[str, Any]:
    """The tiny two-stage cascade; its profile makes ~4 qps need a second light replica."""
    light, heavy = models["light"], models["heavy"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DiffusionCascade",
        "metadata": {"name": name},
        "spec": {
            "sloSeconds": 5,
            "gpuBudget": gpu_budget,
            "objective": "MinExpectedFID",
            "variants": [
                {
                    "name": "light",
                    "model": str(light),
                    "steps": 1,
                    "resolution": 64,
                    "profile": {"batchLatencyMs": {"1": 400, "2": 600, "4": 1000}},
                    "gate": {
                        "discriminator": {"uri": str(light / "gate.pt")},
                        "deferCurve": {"path": str(light / "defer_curve.json")},
                    },
                    "minReplicas": 1,
                },
                {
                    "name": "heavy",
                    "model": str(heavy),
                    "steps": 2,
                    "resolution": 64,
                    "profile": {"batchLatencyMs": {"1": 1000, "2": 1600}},
                    "minReplicas": 1,
                },
            ],
            "quality": {"reference": "c1"},
            "control": {"intervalSeconds": interval, "scaleDownStabilizationSeconds": 5},
        },
    }


@dataclass
class RouterProcess:
    """A real `diffcascade-worker route`, what the router Deployment runs."""

    port: int
    process: subprocess.Popen[bytes]

    def config(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(
                f"http://127.0.0.1:{self.port}/v1/cascade/router",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=5,
            )
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def stop(self) -> None:
        terminate(self.process)


def start_router(logs: Path, *, allowed: Sequence[str]) -> RouterProcess:
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from diffcascade_worker.cli import main; main()",
        "route",
        "--cascade",
        "tiny",
        "--port",
        str(port),
        "--token",
        TOKEN,
        "--log-level",
        "warning",
        *(arg for url in allowed for arg in ("--allowed-stage", url)),
    ]
    with (logs / f"router-{port}.log").open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    return RouterProcess(port=port, process=process)


def adopted(
    children: Iterable[dict[str, Any]],
    *,
    namespace: str,
    cascade: str = "c",
    uid: str = "owner-uid",
) -> list[dict[str, Any]]:
    """Children placed in `namespace` and owned by cascade `cascade` (uid `uid`), as the
    operator applies them (it applies nothing without its cascade's owner reference)."""
    import kopf

    out = list(children)
    for child in out:
        child["metadata"]["namespace"] = namespace
    owner = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DiffusionCascade",
        "metadata": {"name": cascade, "namespace": namespace, "uid": uid},
    }
    kopf.adopt(out, owner=owner)  # type: ignore[arg-type]
    return out


class Cluster:
    """The test's view of the emulated API (typed clients where they help)."""

    def __init__(self, client: kubernetes.client.ApiClient | None = None) -> None:
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.core = kubernetes.client.CoreV1Api(client)

    def create_cascade(self, namespace: str, manifest: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)

    def cascade(self, namespace: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        return obj

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return self.cascade(namespace, name).get("status") or {}

    def condition(self, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
        for cond in self.status(namespace, name).get("conditions") or ():
            if cond.get("type") == kind:
                return dict(cond)
        return None

    def delete_cascade(self, namespace: str, name: str, timeout: float = 30.0) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return
            raise

        def gone() -> bool:
            try:
                self.cascade(namespace, name)
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    return True
                raise
            return False

        wait_for(gone, timeout=timeout, what=f"{namespace}/{name} deleted")

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
        )

    def replicas(self, namespace: str, name: str) -> int | None:
        dep = self.apps.read_namespaced_deployment(name, namespace)
        return None if dep.spec is None else dep.spec.replicas

    def events(self, namespace: str, reason: str | None = None) -> list[Any]:
        items = self.core.list_namespaced_event(namespace).items
        return [e for e in items if reason is None or e.reason == reason]

    def owned(self, namespace: str, uid: str) -> dict[str, list[str]]:
        """Children by kind whose controller owner reference is `uid` (no GC in the emulator)."""
        out: dict[str, list[str]] = {}
        lists = {
            "Deployment": self.apps.list_namespaced_deployment(namespace).items,
            "Service": self.core.list_namespaced_service(namespace).items,
            "Secret": self.core.list_namespaced_secret(namespace).items,
            "ConfigMap": self.core.list_namespaced_config_map(namespace).items,
        }
        for kind, items in lists.items():
            for item in items:
                refs = item.metadata.owner_references or []
                if any(r.uid == uid and r.controller for r in refs):
                    out.setdefault(kind, []).append(item.metadata.name)
        return out

    def create_token_secret(self, namespace: str, cascade: str) -> None:
        """The workers run with TOKEN: hand it to the operator in the Secret it would otherwise
        generate, owned by the cascade as the operator's own would be (the operator reads no
        Secret it does not own). The cascade must exist."""
        uid = self.cascade(namespace, cascade)["metadata"]["uid"]
        self.core.create_namespaced_secret(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": f"{cascade}-token",
                    "ownerReferences": [
                        {
                            "apiVersion": f"{GROUP}/{VERSION}",
                            "kind": "DiffusionCascade",
                            "name": cascade,
                            "uid": uid,
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "stringData": {"token": TOKEN},
            },
        )

    def register_router_pod(self, namespace: str, cascade: str, port: int) -> None:
        """One ready router pod, as the router Deployment's ReplicaSet would create it."""
        labels = {
            "app.kubernetes.io/name": "diffcascade-router",
            "app.kubernetes.io/managed-by": "diffcascade-operator",
            "diffcascade.dev/cascade": cascade,
            "diffcascade.dev/role": "router",
        }
        self.core.create_namespaced_pod(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{cascade}-router-0", "labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "router",
                            "image": "operator",
                            "ports": [{"name": "http", "containerPort": port}],
                        }
                    ]
                },
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            },
        )

    def register_pods(
        self, namespace: str, cascade: str, workers: Mapping[str, WorkerProcess]
    ) -> None:
        """What a ReplicaSet and the kubelet would do: one ready pod per worker process."""
        for variant, worker in workers.items():
            labels = {
                "app.kubernetes.io/name": "diffcascade-worker",
                "app.kubernetes.io/instance": cascade,
                "app.kubernetes.io/component": variant,
                "app.kubernetes.io/managed-by": "diffcascade-operator",
                "diffcascade.dev/cascade": cascade,
                "diffcascade.dev/variant": variant,
            }
            self.core.create_namespaced_pod(
                namespace,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"{cascade}-{variant}-0", "labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "worker",
                                "image": "worker",
                                "ports": [{"name": "http", "containerPort": worker.port}],
                            }
                        ]
                    },
                    "status": {
                        "phase": "Running",
                        "podIP": "127.0.0.1",
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                },
            )


# --- load --------------------------------------------------------------------------------------


class Load:
    """Open-loop POSTs to a worker at `qps`, from a background thread, until stopped."""

    def __init__(self, url: str, qps: float) -> None:
        self.url, self.qps = url, qps
        self.sent = 0
        self.codes: dict[int, int] = {}
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=24, thread_name_prefix="load")
        self._client = httpx.Client(timeout=20)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def _one(self, seed: int) -> None:
        try:
            r = self._client.post(
                f"{self.url}/v1/images/generations",
                json={"prompt": f"a small red cube {seed}", "size": "64x64", "seed": seed},
            )
            code = r.status_code
        except httpx.HTTPError:
            code = 0
        with self._lock:
            self.codes[code] = self.codes.get(code, 0) + 1

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._one, self.sent)
            self.sent += 1
            delay = start + self.sent / self.qps - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def load(url: str, qps: float) -> Iterator[Load]:
    generator = Load(url, qps).start()
    try:
        yield generator
    finally:
        generator.stop()


def operator_env(
    *, prometheus_url: str | None, scrape_fallback: bool = True, tick: float = 0.5
) -> dict[str, str]:
    """Environment for the handlers module (it reads its settings at load time)."""
    env = {
        "DIFFCASCADE_TICK_SECONDS": str(tick),
        "DIFFCASCADE_METRICS_WINDOW_SECONDS": "4",
        "DIFFCASCADE_SCRAPE_FALLBACK": "true" if scrape_fallback else "false",
        "DIFFCASCADE_PUSH_TIMEOUT_SECONDS": "3",
        "DIFFCASCADE_WORKER_IMAGE": "diffcascade-worker:test",
    }
    if prometheus_url:
        env["DIFFCASCADE_PROMETHEUS_URL"] = prometheus_url
    return env


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
