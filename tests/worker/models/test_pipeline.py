"""TextToImagePipeline on the tiny pipelines, through diffusers' real from_pretrained path."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from diffcascade_worker.models.pipeline import (
    ModelLoadError,
    PipelineConfig,
    TextToImagePipeline,
    decode_png_b64,
    encode_png_b64,
)
from diffcascade_worker.models.tiny import read_model_defaults

torch.set_num_threads(1)

# Batched CPU kernels round differently from single-image ones; a seed's image agrees to float
# rounding inside any batch (bitwise when the batch is the same).
BATCH_TOLERANCE = 1e-4


def _load(model_dir: Path, **overrides: object) -> TextToImagePipeline:
    defaults = read_model_defaults(model_dir)
    settings: dict[str, object] = {
        "steps": defaults["steps"],
        "guidance_scale": defaults["guidance_scale"],
        "size": defaults["size"],
        **overrides,
    }
    return TextToImagePipeline.load(PipelineConfig(model=str(model_dir), **settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def light(tiny_models: dict[str, Path]) -> TextToImagePipeline:
    return _load(tiny_models["light"])


def test_loads_a_pipeline_folder_on_cpu_in_float32(light: TextToImagePipeline) -> None:
    assert light.device == "cpu"
    assert light.dtype == torch.float32
    assert type(light.diffusers_pipeline).__name__ == "StableDiffusionPipeline"
    assert light.config.steps == 1


def test_auto_device_and_dtype_resolve_to_cpu_float32_without_cuda() -> None:
    config = PipelineConfig(model="x")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert config.resolved_device() == "cpu"
    assert config.resolved_dtype() == torch.float32
    assert PipelineConfig(model="x", device="cuda").resolved_dtype() == torch.float16
    assert PipelineConfig(model="x", dtype="bf16").resolved_dtype() == torch.bfloat16


def test_local_files_only_follows_hf_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert PipelineConfig(model="x").resolved_local_files_only() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert PipelineConfig(model="x").resolved_local_files_only() is False
    assert PipelineConfig(model="x", local_files_only=True).resolved_local_files_only() is True


def test_missing_folder_raises_model_load_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=str(missing)):
        TextToImagePipeline.load(PipelineConfig(model=str(missing)))


def test_folder_without_model_index_raises_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        TextToImagePipeline.load(PipelineConfig(model=str(tmp_path)))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_uncached_hub_id_raises_model_load_error_offline() -> None:
    with pytest.raises(ModelLoadError, match="nobody/not-a-real-model"):
        TextToImagePipeline.load(
            PipelineConfig(model="nobody/not-a-real-model", local_files_only=True)
        )


def test_bad_dtype_is_a_value_error(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="dtype"):
        TextToImagePipeline.load(PipelineConfig(model=str(tiny_models["light"]), dtype="int7"))


def test_generate_returns_float_images_in_unit_range(light: TextToImagePipeline) -> None:
    images = light.generate(["a cat", "a dog"], [1, 2])
    assert images.shape == (2, 3, 64, 64)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert not torch.equal(images[0], images[1])


def test_same_seed_gives_the_same_image_alone_and_inside_a_batch(
    light: TextToImagePipeline,
) -> None:
    alone = light.generate(["a cat"], [7])[0]
    again = light.generate(["a cat"], [7])[0]
    batch = light.generate(["a lighthouse", "a cat", "a bowl of soup"], [3, 7, 11])
    assert torch.equal(alone, again)
    torch.testing.assert_close(batch[1], alone, atol=BATCH_TOLERANCE, rtol=0)
    assert (batch[0] - alone).abs().max() > 0.01  # a different seed really differs


def test_heavy_pipeline_runs_many_steps_with_guidance(tiny_models: dict[str, Path]) -> None:
    heavy = _load(tiny_models["heavy"])
    assert heavy.config.steps > 1 and heavy.config.guidance_scale > 1
    alone = heavy.generate(["a cat"], [5])[0]
    batch = heavy.generate(["a dog", "a cat"], [9, 5])
    torch.testing.assert_close(batch[1], alone, atol=BATCH_TOLERANCE, rtol=0)


def test_size_override_changes_resolution(light: TextToImagePipeline) -> None:
    assert light.generate(["a cat"], [1], size=32).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("size", [0, 30, 65, 8192])
def test_unsupported_size_is_a_value_error(light: TextToImagePipeline, size: int) -> None:
    with pytest.raises(ValueError, match="size"):
        light.generate(["a cat"], [1], size=size)


def test_bad_prompts_or_seeds_are_a_value_error(light: TextToImagePipeline) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        light.generate(["a", "b"], [1])
    with pytest.raises(ValueError, match="at least one"):
        light.generate([], [])
    with pytest.raises(ValueError, match="seeds"):
        light.generate(["a"], [-1])
    with pytest.raises(ValueError, match="sequence of strings"):
        light.generate("a", [1])


def test_warm_up_runs(light: TextToImagePipeline) -> None:
    light.warm_up()


def test_png_round_trip_keeps_the_image_to_8_bits(light: TextToImagePipeline) -> None:
    image = light.generate(["a cat"], [1])[0]
    text = encode_png_b64(image)
    assert base64.b64decode(text).startswith(b"\x89PNG")
    decoded = decode_png_b64(text)
    assert decoded.shape == image.shape
    assert float((decoded - image).abs().max()) <= 0.5 / 255 + 1e-6


def test_png_encoder_rejects_a_batch() -> None:
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        encode_png_b64(torch.zeros(1, 3, 8, 8))


def test_long_prompts_are_truncated_without_logging_the_prompt(
    light: TextToImagePipeline, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "a very long prompt " * 20 + "private tail words"
    with caplog.at_level("WARNING"):
        images = light.generate([secret], [1])
    assert images.shape == (1, 3, 64, 64)
    assert "private tail words" not in caplog.text
