"""The operator's test bench: kmock as the API server, real workers, a real Prometheus.

The kubeconfig pointing at kmock is set before anything imports `kubernetes` (the client reads
$KUBECONFIG's default location at import time); Kopf, the operator and kubectl all use it.
"""

from __future__ import annotations

from kube_session import KUBE_DIR, KUBECONFIG  # first: sets $KUBECONFIG

# isort: split
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml
from kmock_k8s import ThreadedKMock
from kube_env import (
    CRD_PATH,
    PrometheusProcess,
    WorkerProcess,
    start_workers,
    write_kubeconfig,
)

kubernetes.config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(KUBECONFIG)


@pytest.fixture(scope="module")
def k8s() -> Iterator[ThreadedKMock]:
    """kmock with the real DiffusionCascade CRD registered, and a kubeconfig for it."""
    with ThreadedKMock() as srv:
        write_kubeconfig(KUBECONFIG, srv.url)
        crd = yaml.safe_load(CRD_PATH.read_text())
        srv.call(lambda emu: emu.register_crd(crd))
        kubernetes.config.load_kube_config(config_file=str(KUBECONFIG))
        yield srv


@pytest.fixture(scope="module")
def workers(tiny_models: dict[str, Path]) -> Iterator[dict[str, WorkerProcess]]:
    """A light and a heavy worker process of cascade `tiny`, started once per module."""
    procs = start_workers(tiny_models, cascade="tiny", log_dir=KUBE_DIR)
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def prometheus(workers: dict[str, WorkerProcess]) -> Iterator[PrometheusProcess]:
    if not PrometheusProcess.available():
        pytest.skip("Debian's prometheus is not installed (scripts/install-system-deps.sh)")
    prom = PrometheusProcess(
        targets=[f"127.0.0.1:{w.port}" for w in workers.values()], workdir=KUBE_DIR
    )
    prom.start()
    try:
        yield prom
    finally:
        prom.stop()
