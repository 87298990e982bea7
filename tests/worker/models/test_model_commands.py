"""`diffcascade-worker make-tiny-model` and `gate train|calibrate`, through click's runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffcascade_worker.cli import main
from diffcascade_worker.gate.calibration import read_curve
from diffcascade_worker.gate.scorer import Gate
from diffcascade_worker.gate.training import save_image_folder
from diffcascade_worker.models.tiny import read_model_defaults, tiny_prompts

torch.set_num_threads(1)


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_make_tiny_model_writes_a_loadable_heavy_folder(tmp_path: Path) -> None:
    code, output = _run("make-tiny-model", "--kind", "heavy", "--seed", "2", str(tmp_path / "h"))
    assert code == 0, output
    assert "wrote heavy model" in output
    assert read_model_defaults(tmp_path / "h")["kind"] == "heavy"


def test_make_tiny_model_requires_a_valid_kind(tmp_path: Path) -> None:
    code, output = _run("make-tiny-model", "--kind", "medium", str(tmp_path / "m"))
    assert code == 2 and "'medium' is not one of" in output
    code, output = _run("make-tiny-model", str(tmp_path / "m"))
    assert code == 2 and "Missing option '--kind'" in output


def test_make_tiny_model_refuses_a_non_empty_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    code, output = _run("make-tiny-model", "--kind", "heavy", str(tmp_path))
    assert code == 2 and "not empty" in output
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_gate_train_writes_a_checkpoint(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline

    prompts, seeds = tiny_prompts(16, offset=400), list(range(16))
    for kind, folder in (("heavy", "real"), ("light", "generated")):
        d = read_model_defaults(tiny_models[kind])
        pipeline = TextToImagePipeline.load(
            PipelineConfig(model=str(tiny_models[kind]), steps=d["steps"],
                           guidance_scale=d["guidance_scale"], size=64)
        )  # fmt: skip
        save_image_folder(pipeline.generate(prompts, seeds), tmp_path / folder)
    out = tmp_path / "gate.pt"
    code, output = _run(
        "gate", "train", "--real", str(tmp_path / "real"), "--generated",
        str(tmp_path / "generated"), "--out", str(out), "--epochs", "5",
    )  # fmt: skip
    assert code == 0, output
    assert "held-out accuracy" in output
    assert Gate.load(out).architecture == "tiny-cnn"


def test_gate_train_reports_missing_and_empty_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = str(tmp_path / "g.pt")
    code, output = _run(
        "gate", "train", "--real", str(tmp_path / "nope"), "--generated", str(tmp_path),
        "--out", out,
    )  # fmt: skip
    assert code == 2 and "does not exist" in output
    code, output = _run(
        "gate", "train", "--real", str(tmp_path / "empty"), "--generated",
        str(tmp_path / "empty"), "--out", out,
    )  # fmt: skip
    assert code == 2 and "holds no" in output
    code, output = _run(
        "gate", "train", "--real", str(tmp_path), "--generated", str(tmp_path), "--out", out,
        "--architecture", "resnet",
    )  # fmt: skip
    assert code == 2 and "'resnet' is not one of" in output


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# calibration prompts\n" + "\n\n".join(tiny_prompts(12, offset=500)) + "\n")
    return path


def test_gate_calibrate_writes_the_curve_and_prints_a_summary(
    tiny_models: dict[str, Path], prompts_file: Path, tmp_path: Path
) -> None:
    light = tiny_models["light"]
    out = tmp_path / "curve.json"
    code, output = _run(
        "gate", "calibrate", "--model", str(light), "--gate", str(light / "gate.pt"),
        "--prompts", str(prompts_file), "--limit", "10", "--batch-size", "4", "--out", str(out),
        "--variant", "tiny-light",
    )  # fmt: skip
    assert code == 0, output
    assert "calibrated 10 prompts" in output and "f(0.1)=" in output and "median" in output
    curve = read_curve(out)
    assert curve.prompts == 10 and curve.variant == "tiny-light"
    assert json.loads(out.read_text())["model"] == str(light)


def test_gate_calibrate_reports_bad_inputs(
    tiny_models: dict[str, Path], prompts_file: Path, tmp_path: Path
) -> None:
    light = tiny_models["light"]
    gate = str(light / "gate.pt")
    out = str(tmp_path / "c.json")
    code, output = _run(
        "gate", "calibrate", "--model", str(light), "--gate", str(tmp_path / "none.pt"),
        "--prompts", str(prompts_file), "--out", out,
    )  # fmt: skip
    assert code == 2 and "does not exist" in output
    code, output = _run(
        "gate", "calibrate", "--model", str(tmp_path / "no-model"), "--gate", gate,
        "--prompts", str(prompts_file), "--out", out,
    )  # fmt: skip
    assert code == 1 and "does not exist" in output and "Traceback" not in output
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    code, output = _run(
        "gate", "calibrate", "--model", str(light), "--gate", gate, "--prompts", str(empty),
        "--out", out,
    )  # fmt: skip
    assert code == 2 and "holds no prompts" in output
    code, output = _run(
        "gate", "calibrate", "--model", str(light), "--gate", gate, "--prompts",
        str(prompts_file), "--size", "65", "--out", out,
    )  # fmt: skip
    assert code == 1 and "multiple of 8" in output
    bad_gate = tmp_path / "bad.pt"
    bad_gate.write_bytes(b"junk")
    code, output = _run(
        "gate", "calibrate", "--model", str(light), "--gate", str(bad_gate), "--prompts",
        str(prompts_file), "--out", out,
    )  # fmt: skip
    assert code == 1 and "not a readable torch file" in output
