"""`diffcascade up` runs a light -> heavy SDXL cascade written as the paper's cascade 3 is:
SDXL base + a Lightning-style UNet file + trailing Euler, gated by clip-score, deferring to
SDXL base. Tiny random-weight SDXL models stand in for the real ones (same topology)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from diffcascade_operator.local.runner import EXIT_INTERRUPTED
from diffcascade_worker.models.tiny import make_tiny_clip
from diffcascade_worker.models.tiny_families import LIGHTNING_UNET_FILE
from test_local_up_e2e import READY, UpProcess, wait_until_gone

pytestmark = pytest.mark.slow


def sdxl_cascade(families: dict[str, Path], clip: Path) -> dict[str, Any]:
    """FID lowest at light share 0 and room for it: the plan defers every query."""
    return {
        "apiVersion": "diffcascade.dev/v1alpha1",
        "kind": "DiffusionCascade",
        "metadata": {"name": "sdxl"},
        "spec": {
            "sloSeconds": 30,
            "gpuBudget": 2,
            "variants": [
                {
                    "name": "sdxl-lightning",
                    "model": str(families["sdxl"]),
                    "unet": str(families["sdxl-lightning"] / LIGHTNING_UNET_FILE),
                    "scheduler": {
                        "class": "EulerDiscreteScheduler",
                        "config": {"timestep_spacing": "trailing"},
                    },
                    "steps": 2,
                    "resolution": 64,
                    "minReplicas": 1,
                    "maxReplicas": 1,
                    "maxBatchSize": 2,
                    "profile": {"batchLatencyMs": {"1": 100, "2": 150}},
                    "gate": {
                        "discriminator": {"uri": str(clip), "architecture": "clip-score"},
                        "deferCurve": {"thresholds": [0, 1], "deferFractions": [0, 1]},
                    },
                },
                {
                    "name": "sdxl",
                    "model": str(families["sdxl"]),
                    "steps": 4,
                    "guidanceScale": 5,
                    "resolution": 64,
                    "minReplicas": 1,
                    "maxReplicas": 1,
                    "maxBatchSize": 2,
                    "profile": {"batchLatencyMs": {"1": 300, "2": 500}},
                },
            ],
            "quality": {
                "fidByLightShare": [{"lightShare": 0, "fid": 10}, {"lightShare": 1, "fid": 20}]
            },
            "control": {"intervalSeconds": 1},
        },
    }


def _cmdline(pid: int) -> list[str]:
    try:
        return list(psutil.Process(pid).cmdline())
    except psutil.Error:
        return []


def test_up_serves_a_lightning_to_sdxl_cascade(
    tiny_families: dict[str, Path], tmp_path: Path
) -> None:
    clip = make_tiny_clip(tmp_path / "clip")
    path = tmp_path / "sdxl.yaml"
    path.write_text(yaml.safe_dump(sdxl_cascade(tiny_families, clip)))
    run_dir = tmp_path / "run"
    up = UpProcess(
        [str(path), "--port", "0", "--no-live", "--no-prometheus", "--run-dir", str(run_dir)],
        tmp_path,
    )
    try:
        url = up.wait_for(READY, timeout_s=180).group(1)
        deadline = time.monotonic() + 90
        images: list[dict[str, Any]] = []
        answers: list[str] = []
        # Until the first plan (defer all) reached the light stage and the heavy one answers: a
        # deferral before the heavy worker is ready comes back degraded (light, deferred).
        while time.monotonic() < deadline:
            response = httpx.post(
                f"{url}/v1/images/generations",
                json={"prompt": "a lighthouse at dusk", "n": 2, "seed": 1},
                timeout=60.0,
            )
            answers.append(f"{response.status_code} {response.text[:200]}")
            if response.status_code == 200:
                images = response.json()["data"]
                if all(image["deferred"] and image["served_by"] == "sdxl" for image in images):
                    break
            time.sleep(0.5)
        summary = [(i["served_by"], i["deferred"]) for i in images]
        assert summary == [("sdxl", True)] * 2, (answers[-3:], up.output[-2000:])
        assert all(i["confidence"] is not None for i in images)  # the clip-score gate ran
        # The light worker was started assembled as written (the flags the worker test shows
        # running timesteps [999, 499]); the heavy one is plain SDXL base.
        up.remember_children()
        argv = {pid: _cmdline(pid) for pid in up.seen}
        light = [a for a in argv.values() if "--variant=sdxl-lightning" in a]
        heavy = [a for a in argv.values() if "--variant=sdxl" in a]
        assert light and heavy, argv
        unet = tiny_families["sdxl-lightning"] / LIGHTNING_UNET_FILE
        assert {
            f"--unet={unet}",
            "--scheduler=EulerDiscreteScheduler",
            '--scheduler-config={"timestep_spacing":"trailing"}',
            "--steps=2",
        } <= set(light[0])
        assert not any(a.startswith(("--unet", "--scheduler")) for a in heavy[0])
    finally:
        code = up.interrupt()
    assert code == EXIT_INTERRUPTED, up.output
    assert wait_until_gone(up.seen) == []
