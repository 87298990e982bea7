"""Each family served by `diffcascade-worker serve` and profiled by `diffcascade-worker profile`.

The workers start together (each start is mostly torch's import), from the session's tiny
families; the Lightning stage is SDXL base + a UNet file + trailing Euler, given as flags.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from diffcascade_worker.cli import main
from diffcascade_worker.models.pipeline import decode_png_b64
from diffcascade_worker.models.tiny import make_tiny_clip
from diffcascade_worker.models.tiny_families import LIGHTNING_UNET_FILE
from worker_testing import WorkerProcess, start_worker

TRAILING = [
    "--scheduler", "EulerDiscreteScheduler",
    "--scheduler-config", '{"timestep_spacing": "trailing"}',
]  # fmt: skip
INFO = ["--log-level", "info"]


def _lightning_args(families: dict[str, Path], *, guidance: str = "--guidance") -> list[str]:
    unet = families["sdxl-lightning"] / LIGHTNING_UNET_FILE
    return ["--unet", str(unet), *TRAILING, "--steps", "2", guidance, "0"]


@pytest.fixture(scope="module")
def served(
    tiny_families: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("family-logs")
    size = ["--size", "64"]
    specs = {
        "sd-turbo": (tiny_families["sd-turbo"], ["--steps", "1", "--guidance", "0"]),
        "sdxs": (tiny_families["sdxs"], ["--steps", "1", "--guidance", "0"]),
        "sdxl-lightning": (tiny_families["sdxl"], _lightning_args(tiny_families)),
        "sd15-safety": (
            tiny_families["sd15-safety"],
            ["--steps", "2", "--guidance", "7.5", "--safety-checker"],
        ),
    }
    workers = {
        name: start_worker(model=model, variant=name, logs=logs, args=[*args, *size, *INFO])
        for name, (model, args) in specs.items()
    }
    try:
        yield workers
    finally:
        for worker in workers.values():
            worker.terminate()


def _generate(worker: WorkerProcess, n: int = 2) -> list[dict[str, object]]:
    response = httpx.post(
        worker.url + "/v1/images/generations",
        json={"prompt": "a lighthouse at dusk", "n": n, "seed": 7},
        timeout=120.0,
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, object]] = response.json()["data"]
    return data


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd-turbo", "sdxs", "sdxl-lightning", "sd15-safety"])
def test_each_family_is_served_by_the_worker(served: dict[str, WorkerProcess], family: str) -> None:
    worker = served[family]
    worker.wait_ready()
    images = _generate(worker)
    assert [image["served_by"] for image in images] == [family, family]
    pixels = [decode_png_b64(str(image["b64_json"])) for image in images]
    assert all(p.shape == (3, 64, 64) for p in pixels)
    if family == "sd15-safety":  # flagged: black, and the response says so
        assert [image["nsfw_content_detected"] for image in images] == [True, True]
        assert all(p.amax() == 0 for p in pixels)
    else:
        assert all(image["nsfw_content_detected"] is None for image in images)
    if family == "sdxl-lightning":  # the log names what really runs
        assert "timesteps [999, 499] at 2 step(s)" in worker.log.read_text()


def _profile(tmp_path: Path, *args: str) -> tuple[dict[str, object], str]:
    out = tmp_path / "profile.json"
    common = ["--batch-sizes", "1,2", "--repeats", "1", "--device", "cpu", "--size", "64"]
    result = CliRunner().invoke(
        main, ["profile", *args, *common, "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text()), result.output


@pytest.mark.parametrize("family", ["sd-turbo", "sdxs", "sdxl"])
def test_each_family_is_profiled_by_the_worker(
    tiny_families: dict[str, Path], tmp_path: Path, family: str
) -> None:
    steps = "4" if family == "sdxl" else "1"
    doc, output = _profile(tmp_path, "--model", str(tiny_families[family]), "--steps", steps)
    table = doc["batchLatencyMs"]
    assert isinstance(table, dict) and sorted(table) == ["1", "2"]
    assert "timesteps" in output


def test_lightning_is_profiled_as_assembled_with_its_gate(
    tiny_families: dict[str, Path], tmp_path: Path
) -> None:
    clip = make_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(8)) + "\n")
    doc, output = _profile(
        tmp_path,
        "--model", str(tiny_families["sdxl"]),
        *_lightning_args(tiny_families, guidance="--guidance-scale"),
        "--gate", str(clip), "--prompts", str(prompts),
    )  # fmt: skip
    assert "timesteps [999, 499] at 2 step(s)" in output
    assert doc["steps"] == 2 and "deferCurve" in doc


def test_a_scheduler_field_typo_is_an_error_naming_the_fields_there_are(
    tiny_families: dict[str, Path],
) -> None:
    typo = ["--scheduler", "EulerDiscreteScheduler", "--scheduler-config", '{"spacing": "x"}']
    result = CliRunner().invoke(
        main, ["profile", "--model", str(tiny_families["sdxl"]), "--device", "cpu", *typo]
    )
    assert result.exit_code == 1
    assert "has no config field(s) ['spacing']" in result.output
    assert "timestep_spacing" in result.output
