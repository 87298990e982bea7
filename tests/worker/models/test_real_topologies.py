"""The paper's model families, at toy widths, through the worker's loader.

Each topology is built once per session (`tiny_families`) from diffusers' and transformers' real
classes and read back through `TextToImagePipeline.load`, the code `serve` and `profile` use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffcascade_worker.models.assembly import PipelineAssembly, SchedulerChoice
from diffcascade_worker.models.pipeline import ModelLoadError, PipelineConfig, TextToImagePipeline
from diffcascade_worker.models.tiny_families import (
    LIGHTNING_UNET_FILE,
    build_tiny_family,
    sdxl_unet,
)
from safetensors.torch import load_file

TRAILING = SchedulerChoice(
    class_name="EulerDiscreteScheduler", config={"timestep_spacing": "trailing"}
)


def _load(folder: Path, *, steps: int = 1, guidance: float = 0.0, **assembly: Any) -> Any:
    return TextToImagePipeline.load(
        PipelineConfig(
            model=str(folder),
            steps=steps,
            guidance_scale=guidance,
            size=64,
            device="cpu",
            dtype="float32",
            assembly=PipelineAssembly(**assembly),
        )
    )


def _lightning(families: dict[str, Path]) -> dict[str, Any]:
    return {"unet": str(families["sdxl-lightning"] / LIGHTNING_UNET_FILE), "scheduler": TRAILING}


def _timesteps_run(pipeline: TextToImagePipeline) -> list[int]:
    """The timesteps the UNet is really called with while one batch is generated."""
    seen: list[int] = []
    unet = pipeline.diffusers_pipeline.unet
    hook = unet.register_forward_pre_hook(lambda _m, args: seen.append(int(args[1])))
    try:
        pipeline.generate(["a lighthouse at dusk"], [3])
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize(
    ("family", "steps", "guidance", "classes", "timesteps"),
    [
        ("sd-turbo", 1, 0.0, ("StableDiffusionPipeline", "AutoencoderKL"), [999]),
        ("sdxs", 1, 0.0, ("StableDiffusionPipeline", "AutoencoderTiny"), [999]),
        ("sdxl", 4, 5.0, ("StableDiffusionXLPipeline", "AutoencoderKL"), [751, 501, 251, 1]),
    ],
)
def test_each_topology_loads_and_generates_through_the_worker_loader(
    tiny_families: dict[str, Path],
    family: str,
    steps: int,
    guidance: float,
    classes: tuple[str, str],
    timesteps: list[int],
) -> None:
    pipeline = _load(tiny_families[family], steps=steps, guidance=guidance)
    pipe = pipeline.diffusers_pipeline
    assert (type(pipe).__name__, type(pipe.vae).__name__) == classes
    assert pipeline.timesteps() == timesteps
    out = pipeline.generate_batch(["a cat", "a red bicycle"], [0, 1])
    assert out.images.shape == (2, 3, 64, 64) and out.nsfw_content_detected is None
    assert torch.isfinite(out.images).all()
    if family == "sdxl":  # two text encoders, the second with a projection
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_lightning_runs_999_and_499_with_its_own_unet_where_sdxl_base_runs_501_and_1(
    tiny_families: dict[str, Path],
) -> None:
    base = _load(tiny_families["sdxl"], steps=2)
    assert _timesteps_run(base) == [501, 1]  # SDXL base's "leading" Euler at 2 steps
    lightning = _load(tiny_families["sdxl"], steps=2, **_lightning(tiny_families))
    assert lightning.timesteps() == [999, 499]
    assert _timesteps_run(lightning) == [999, 499]  # what the UNet is really called with
    assert "timesteps [999, 499] at 2 step(s)" in lightning.describe()
    served = lightning.diffusers_pipeline.unet.state_dict()
    from_file = load_file(str(tiny_families["sdxl-lightning"] / LIGHTNING_UNET_FILE))
    assert served.keys() == from_file.keys()
    assert all(torch.equal(served[k], from_file[k]) for k in from_file)
    base_unet = base.diffusers_pipeline.unet.state_dict()
    assert not all(torch.equal(base_unet[k], from_file[k]) for k in from_file)


def test_a_replacement_unet_may_be_a_model_folder(
    tiny_families: dict[str, Path], tmp_path: Path
) -> None:
    unet = sdxl_unet(seed=7)
    unet.save_pretrained(tmp_path / "unet")
    pipeline = _load(tiny_families["sdxl"], steps=2, unet=str(tmp_path / "unet"))
    served = pipeline.diffusers_pipeline.unet.state_dict()
    assert all(torch.equal(served[k], v) for k, v in unet.state_dict().items())


def test_the_lightning_repo_as_a_model_says_how_to_use_it(tiny_families: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="one file as the replacement unet"):
        _load(tiny_families["sdxl-lightning"], steps=2)


def test_a_state_dict_of_another_architecture_is_refused_with_what_is_expected(
    tiny_families: dict[str, Path],
) -> None:
    other = tiny_families["sd-turbo"] / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelLoadError, match="diffusers-format UNet2DConditionModel state dict"):
        _load(tiny_families["sdxl"], steps=2, unet=str(other))


def test_scheduler_mistakes_are_refused_before_any_weights_load(
    tiny_families: dict[str, Path],
) -> None:
    typo = SchedulerChoice(
        class_name="EulerDiscreteScheduler", config={"timestep_spacin": "trailing"}
    )
    with pytest.raises(ValueError, match=r"no config field\(s\) \['timestep_spacin'\]"):
        _load(tiny_families["sdxl"], steps=2, scheduler=typo)
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        _load(tiny_families["sdxl"], scheduler=SchedulerChoice(class_name="FancyScheduler"))


def test_fp16_weights_are_the_ones_loaded_when_asked_and_alone_they_need_asking(
    tmp_path: Path,
) -> None:
    both, only = tmp_path / "both", tmp_path / "fp16-only"
    default_weights = build_tiny_family("sd-turbo", seed=0)
    half_weights = build_tiny_family("sd-turbo", seed=1)  # other weights: which file was read?
    default_weights.save_pretrained(both)
    half_weights.to(torch.float16).save_pretrained(both, variant="fp16")
    half_weights.save_pretrained(only, variant="fp16")

    def unet_weight(pipeline: TextToImagePipeline) -> torch.Tensor:
        return pipeline.diffusers_pipeline.unet.conv_in.weight.detach().float()

    expected = half_weights.unet.conv_in.weight.detach().to(torch.float16).float()
    assert torch.equal(unet_weight(_load(both, weights_variant="fp16")), expected)
    assert torch.equal(unet_weight(_load(both)), default_weights.unet.conv_in.weight.detach())
    with pytest.raises(ModelLoadError):
        _load(only)  # no default files: the variant must be asked for
    assert _load(only, weights_variant="fp16").generate(["a cat"], [0]).shape == (1, 3, 64, 64)


def test_the_safety_checker_is_off_unless_asked_and_then_its_black_images_are_flagged(
    tiny_families: dict[str, Path],
) -> None:
    folder = tiny_families["sd15-safety"]
    off = _load(folder, steps=2, guidance=7.5).generate_batch(["a cat", "a dog"], [0, 1])
    assert off.nsfw_content_detected is None and off.images.amax() > 0
    assert _load(folder, steps=2).diffusers_pipeline.safety_checker is None
    on = _load(folder, steps=2, guidance=7.5, safety_checker=True)
    flagged = on.generate_batch(["a cat", "a dog"], [0, 1])
    assert flagged.nsfw_content_detected == [True, True]  # this checker flags everything
    assert flagged.images.amax() == 0  # what diffusers does to a flagged image: black
    with pytest.raises(ModelLoadError, match="has no safety checker"):
        _load(tiny_families["sd-turbo"], safety_checker=True)


def test_flagged_batches_are_not_logged_again_beside_the_response_mark(
    tiny_families: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = _load(tiny_families["sd15-safety"], steps=2, safety_checker=True)
    with caplog.at_level("WARNING"):
        assert pipeline.generate_batch(["a cat"], [0]).nsfw_content_detected == [True]
    assert "NSFW" not in caplog.text


def test_a_model_folders_diffcascade_json_assembles_what_the_engine_serves(
    tiny_families: dict[str, Path], tmp_path: Path
) -> None:
    import json
    import shutil

    from diffcascade_worker.models.engine import DiffusersEngine
    from diffcascade_worker.serving.settings import WorkerSettings

    folder = tmp_path / "lightning-baked"
    shutil.copytree(tiny_families["sdxl"], folder)
    shutil.copy(tiny_families["sdxl-lightning"] / LIGHTNING_UNET_FILE, folder / "unet.safetensors")
    record = {
        "steps": 2,
        "guidanceScale": 0,
        "size": 64,
        "unet": "unet.safetensors",  # relative to the folder
        "scheduler": {
            "class": "EulerDiscreteScheduler",
            "config": {"timestep_spacing": "trailing"},
        },
    }
    (folder / "diffcascade.json").write_text(json.dumps(record))
    settings = WorkerSettings(model=str(folder), variant="v", device="cpu", dtype="float32")
    engine = DiffusersEngine.load(settings)
    assert engine._pipeline.timesteps() == [999, 499]
    assert engine._pipeline.config.assembly.unet == str(folder / "unet.safetensors")
    assert len(engine.run_batch(["a cat"], [0]).images) == 1
