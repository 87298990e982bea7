"""Set-up shared by the operator benchmarks: the same parts as tests/operator/kube.

kmock (with the project's StampingEmulator) as the API server, tiny worker processes, Debian's
Prometheus scraping them, and the unmodified operator under `kopf.testing.KopfRunner`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WORKDIR = Path(tempfile.mkdtemp(prefix="dc-opbench-"))
KUBECONFIG = WORKDIR / "kubeconfig"
os.environ["KUBECONFIG"] = str(KUBECONFIG)  # before anything imports `kubernetes`

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests" / "operator" / "kube"))

import kubernetes  # noqa: E402
import yaml  # noqa: E402
from kmock_k8s import ThreadedKMock  # noqa: E402
from kube_env import (  # noqa: E402
    CRD_PATH,
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
    start_workers,
    wait_for,
    write_kubeconfig,
)

__all__ = [
    "GROUP",
    "PLURAL",
    "RESULTS",
    "VERSION",
    "Bench",
    "Cluster",
    "bench_env",
    "cascade_manifest",
    "load",
    "machine",
    "operator",
    "operator_env",
    "wait_for",
]

kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(KUBECONFIG)


def tiny_models(models: Path | None) -> dict[str, Path]:
    """Reuse `--models DIR` (with light/ and heavy/) or build the tiny pipelines once."""
    if models is not None:
        return {"light": models / "light", "heavy": models / "heavy"}
    import torch
    from diffcascade_worker.models.tiny import make_tiny_model

    torch.set_num_threads(1)
    root = WORKDIR / "models"
    return {k: make_tiny_model(k, root / k) for k in ("heavy", "light")}


@dataclass
class Bench:
    k8s: ThreadedKMock
    workers: dict[str, WorkerProcess]
    prometheus: PrometheusProcess
    models: dict[str, Path]


@contextmanager
def bench_env(models_dir: Path | None) -> Iterator[Bench]:
    models = tiny_models(models_dir)
    with ThreadedKMock() as srv:
        write_kubeconfig(KUBECONFIG, srv.url)
        crd = yaml.safe_load(CRD_PATH.read_text())
        srv.call(lambda emu: emu.register_crd(crd))
        kubernetes.config.load_kube_config(config_file=str(KUBECONFIG))
        workers = start_workers(models, cascade="tiny", log_dir=WORKDIR)
        prom = PrometheusProcess(
            targets=[f"127.0.0.1:{w.port}" for w in workers.values()], workdir=WORKDIR
        )
        try:
            prom.start()
            yield Bench(srv, workers, prom, models)
        finally:
            prom.stop()
            for w in workers.values():
                w.stop()


@contextmanager
def operator(env: dict[str, str]) -> Iterator[Any]:
    """The unmodified operator (all namespaces, standalone) in this process."""
    from kopf._core.intents.registries import SmartOperatorRegistry
    from kopf.testing import KopfRunner

    with environment(env):
        runner = KopfRunner(
            ["run", "--standalone", "--all-namespaces", str(HANDLERS)],
            timeout=120,
            registry=SmartOperatorRegistry(),
        )
        with runner:
            yield runner
    with suppress(OSError):
        (WORKDIR / "operator.log").write_text(runner.output)


def machine() -> dict[str, Any]:
    import platform

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
    }
