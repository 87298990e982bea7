"""make_tiny_model: offline tiny pipelines with recorded defaults, gate and curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffcascade_worker.gate.calibration import read_curve
from diffcascade_worker.models.tiny import (
    CURVE_FILE,
    DEFAULTS_FILE,
    GATE_FILE,
    build_tiny_pipeline,
    make_tiny_model,
    read_model_defaults,
    tiny_prompts,
)

torch.set_num_threads(1)


def test_folders_are_diffusers_pipelines_with_defaults(tiny_models: dict[str, Path]) -> None:
    for kind, folder in tiny_models.items():
        assert (folder / "model_index.json").is_file()
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionPipeline"
        assert json.loads((folder / DEFAULTS_FILE).read_text())["kind"] == kind


def test_light_is_one_step_turbo_like_and_heavy_is_guided_ddim(
    tiny_models: dict[str, Path],
) -> None:
    light = read_model_defaults(tiny_models["light"])
    heavy = read_model_defaults(tiny_models["heavy"])
    assert (light["steps"], light["guidance_scale"], light["size"]) == (1, 0.0, 64)
    assert heavy["steps"] > 1 and heavy["guidance_scale"] > 1 and heavy["size"] == 64
    light_sched = json.loads((tiny_models["light"] / "scheduler/scheduler_config.json").read_text())
    heavy_sched = json.loads((tiny_models["heavy"] / "scheduler/scheduler_config.json").read_text())
    assert light_sched["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert light_sched["timestep_spacing"] == "trailing"
    assert heavy_sched["_class_name"] == "DDIMScheduler"


def test_light_folder_holds_gate_and_curve_and_heavy_does_not(
    tiny_models: dict[str, Path],
) -> None:
    light = read_model_defaults(tiny_models["light"])
    assert light["gate"] == tiny_models["light"] / GATE_FILE and light["gate"].is_file()
    assert light["defer_curve"] == tiny_models["light"] / CURVE_FILE
    curve = read_curve(light["defer_curve"])
    assert len(curve.thresholds) == 201 and curve.prompts == len(curve.confidences) > 0
    # the tiny gate's confidences are spread, so mid thresholds defer a graded share
    assert 0.0 < curve.defer_fraction(0.1) < curve.defer_fraction(0.5) <= 1.0
    assert "gate" not in read_model_defaults(tiny_models["heavy"])


def test_read_model_defaults_is_empty_without_a_record(tmp_path: Path) -> None:
    assert read_model_defaults(tmp_path) == {}
    assert read_model_defaults("stabilityai/sd-turbo") == {}


def test_read_model_defaults_reports_a_broken_record(tmp_path: Path) -> None:
    (tmp_path / DEFAULTS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=DEFAULTS_FILE):
        read_model_defaults(tmp_path)


def test_same_seed_builds_identical_weights_and_other_seeds_differ() -> None:
    first = build_tiny_pipeline("light", seed=3).unet.state_dict()
    second = build_tiny_pipeline("light", seed=3).unet.state_dict()
    other = build_tiny_pipeline("light", seed=4).unet.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_building_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("heavy", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_heavy_model_writes_into_a_new_folder(tmp_path: Path) -> None:
    out = make_tiny_model("heavy", tmp_path / "nested" / "heavy", seed=1)
    assert out == tmp_path / "nested" / "heavy"
    assert read_model_defaults(out)["kind"] == "heavy"


def test_unknown_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        make_tiny_model("medium", tmp_path)  # type: ignore[arg-type]


def test_tiny_prompts_are_deterministic_and_varied() -> None:
    assert tiny_prompts(5) == tiny_prompts(5)
    assert len(set(tiny_prompts(100))) == 100
    assert tiny_prompts(3, offset=2)[0] == tiny_prompts(3)[2]


@pytest.mark.slow
def test_light_model_is_deterministic_given_the_seed(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    again = make_tiny_model("light", tmp_path / "light", seed=0)
    first = torch.load(tiny_models["light"] / GATE_FILE, weights_only=True)["state_dict"]
    second = torch.load(again / GATE_FILE, weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (
        read_curve(again / CURVE_FILE).confidences
        == read_curve(tiny_models["light"] / CURVE_FILE).confidences
    )
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (again / unet).read_bytes() == (tiny_models["light"] / unet).read_bytes()
