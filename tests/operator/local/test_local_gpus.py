"""`up` on a GPU machine: each worker process gets GPUs of its own (CUDA_VISIBLE_DEVICES).

No GPU here: the GPU ids are given to the actuator as `up` would find them; the workers are
real processes, and what they were given is read from their environment.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psutil
import pytest
import yaml
from diffcascade_operator.local.actuator import LocalActuator
from diffcascade_operator.local.gpus import GpuAssigner, visible_gpus
from diffcascade_operator.local.router import Router
from diffcascade_operator.local.supervisor import Supervisor
from diffcascade_operator.spec import load_manifest

REPO = Path(__file__).resolve().parents[3]


def test_visible_gpus_come_from_cuda_visible_devices_else_nvidia_smi() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0, 2"}) == ("0", "2")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == ()
    assert visible_gpus({}, run=lambda argv: "0\n1\n2\n3\n") == ("0", "1", "2", "3")
    assert visible_gpus({}, run=lambda argv: None) == ()  # no nvidia-smi: a CPU machine


def test_assigner_hands_out_free_gpus_and_takes_them_back() -> None:
    gpus = GpuAssigner(["0", "1", "2"])
    a, b = object(), object()
    gpus.hold(a, gpus.pick(2) or ())
    assert gpus.pick(2) is None and gpus.pick(1) == ("2",)
    gpus.hold(b, ("2",))
    gpus.keep_only([b])  # a exited
    assert gpus.free() == ["0", "1"]
    assert GpuAssigner([]).pick(1) == () and GpuAssigner([]).env(()) == {}


def _environ(pid: int) -> dict[str, str]:
    return dict(psutil.Process(pid).environ())


def test_each_worker_gets_its_own_gpu_and_none_is_shared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, spec = load_manifest(yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text()))
    supervisor = Supervisor(cascade="tiny", log_dir=tmp_path, token="t", drain_timeout_s=1.0)
    router = Router(variants=["light", "heavy"], plan=dict, cascade="tiny")
    actuator = LocalActuator(
        spec=spec,
        supervisor=supervisor,
        router=router,
        token="t",
        base_dir=tmp_path,
        gpus=("0", "1", "2"),
    )
    try:
        actuator._scale("light", 2)
        with caplog.at_level(logging.WARNING):
            actuator._scale("heavy", 2)  # one GPU left for two workers
        given = [_environ(w.process.pid)["CUDA_VISIBLE_DEVICES"] for w in supervisor.workers]
        assert sorted(given) == ["0", "1", "2"]
        assert [w.variant for w in supervisor.workers] == ["light", "light", "heavy"]
        assert "no free GPU for another heavy worker" in caplog.text
    finally:
        supervisor.shutdown(grace_s=2.0)
