"""What `fetch` downloads of a hub repository: what the worker's pipeline will load, no more."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from diffcascade_worker.models.assembly import PipelineAssembly, SchedulerChoice
from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline
from diffcascade_worker.models.tiny_families import LIGHTNING_UNET_FILE, build_tiny_family
from diffcascade_worker.storage.pipeline_files import (
    PipelineSelection,
    select_pipeline_files,
    select_weights,
    unloadable_components,
)
from diffcascade_worker.storage.uris import (
    Scheme,
    StorageError,
    hub_selection,
    local_path,
    parse_uri,
)

TRAILING = SchedulerChoice(
    class_name="EulerDiscreteScheduler", config={"timestep_spacing": "trailing"}
)
INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "image_encoder": [None, None],
}
FILES = [
    "model_index.json",
    "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",  # only .bin for the fp16 variant below
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/openvino_model.xml",
    "vae/config.json",
    "vae/diffusion_pytorch_model-00001-of-00002.safetensors",  # sharded default weights
    "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.json",
    "vae_large/config.json",
    "vae_large/diffusion_pytorch_model.safetensors",
]
ALWAYS = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
    "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
    "vae/diffusion_pytorch_model.safetensors.index.json",
}


def test_fp16_where_a_component_has_it_the_default_files_where_it_does_not() -> None:
    chosen = set(select_pipeline_files(FILES, INDEX, PipelineSelection(weights_variant="fp16")))
    assert chosen == ALWAYS | {
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.bin",
    }


def test_default_weights_prefer_safetensors_and_never_take_non_ema_or_other_frameworks() -> None:
    chosen = set(select_pipeline_files(FILES, INDEX, PipelineSelection()))
    assert chosen == ALWAYS | {
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.bin",
    }


def test_the_safety_checker_is_fetched_only_when_it_runs() -> None:
    chosen = set(select_pipeline_files(FILES, INDEX, PipelineSelection(safety_checker=True)))
    assert {
        "safety_checker/config.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
    } <= chosen


def test_a_replaced_unet_keeps_its_config_and_none_of_its_weights() -> None:
    selection = PipelineSelection(weights_variant="fp16", replaced_denoiser=True)
    chosen = set(select_pipeline_files(FILES, INDEX, selection))
    assert "unet/config.json" in chosen
    assert not any(f.startswith("unet/diffusion") for f in chosen)


def test_a_component_with_only_variant_files_needs_the_variant_said() -> None:
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]
    index = {"unet": ["diffusers", "UNet2DConditionModel"]}
    assert unloadable_components(files, index, PipelineSelection()) == {"unet": ["fp16"]}
    assert unloadable_components(files, index, PipelineSelection(weights_variant="fp16")) == {}
    assert select_weights(["model.bf16.safetensors"], variant="fp16") == []


def test_hf_uris_may_name_one_file_or_folder_of_a_repository() -> None:
    uri = parse_uri("hf://ByteDance/SDXL-Lightning/sdxl_lightning_2step_unet.safetensors")
    assert (uri.scheme, uri.path, uri.revision, uri.file) == (
        Scheme.HF,
        "ByteDance/SDXL-Lightning",
        None,
        "sdxl_lightning_2step_unet.safetensors",
    )
    assert local_path(uri) == (
        "/models/hf/ByteDance/SDXL-Lightning/main/sdxl_lightning_2step_unet.safetensors"
    )
    pinned = parse_uri("hf://org/name@v1.0/unet")
    assert (pinned.revision, pinned.file) == ("v1.0", "unet")
    pr = parse_uri("hf://org/name@refs/pr/3/unet/x.safetensors")
    assert (pr.revision, pr.file) == ("refs/pr/3", "unet/x.safetensors")
    assert parse_uri("hf://org/name@refs/pr/3").file == ""  # as before: the whole repo
    with pytest.raises(StorageError, match=r"'\.' and '\.\.'"):
        parse_uri("hf://org/name/../x")


def test_a_file_uri_fetches_that_file_and_a_folder_its_variants_weights() -> None:
    listing: dict[str, int | None] = {
        "a_unet.safetensors": 5,
        "b_unet.safetensors": 5,
        "unet/config.json": 1,
        "unet/diffusion_pytorch_model.safetensors": 4,
        "unet/diffusion_pytorch_model.fp16.safetensors": 2,
    }
    fp16 = PipelineSelection(weights_variant="fp16")
    assert hub_selection(parse_uri("hf://o/r/a_unet.safetensors"), listing) == [
        "a_unet.safetensors"
    ]
    assert hub_selection(parse_uri("hf://o/r/unet"), listing, selection=fp16) == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]
    with pytest.raises(StorageError, match="has no c_unet"):
        hub_selection(parse_uri("hf://o/r/c_unet.safetensors"), listing)


def test_a_pipeline_the_worker_could_not_load_is_refused_by_fetch() -> None:
    listing: dict[str, int | None] = {
        "model_index.json": 1,
        "unet/config.json": 1,
        "unet/diffusion_pytorch_model.fp16.safetensors": 2,
    }
    index = {"unet": ["diffusers", "UNet2DConditionModel"]}
    with pytest.raises(StorageError, match=r"unet \(has: fp16\); set weightsVariant"):
        hub_selection(parse_uri("hf://o/r"), listing, model_index=index)


def _hub_cache(repo_id: str, source: Path, home: Path) -> None:
    """The hub cache layout (refs/main -> snapshots/<commit>) built by hand."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_fetch_puts_a_pipeline_and_one_unet_file_where_serve_loads_them_offline(
    tiny_families: dict[str, Path], tmp_path: Path
) -> None:
    """The Lightning layout from hub caches: `fetch --model --unet` as the init container runs
    it, then the worker's loader on the printed paths, offline."""
    home = tmp_path / "hf-home"
    _hub_cache("acme/sdxl-base", tiny_families["sdxl"], home)
    _hub_cache("acme/lightning", tiny_families["sdxl-lightning"], home)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    cache = tmp_path / "cache"
    unet_uri = f"hf://acme/lightning/{LIGHTNING_UNET_FILE}"
    fetch = [
        "fetch",
        "--cache-dir",
        str(cache),
        "--model=hf://acme/sdxl-base",
        f"--unet={unet_uri}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "diffcascade_worker.cli", *fetch, "--weights-variant=fp16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    model = Path(local_path("hf://acme/sdxl-base", cache_dir=str(cache)))
    unet = Path(local_path(unet_uri, cache_dir=str(cache)))
    assert f"{unet_uri} -> {unet}" in done.stdout and unet.is_file()
    pipeline = TextToImagePipeline.load(
        PipelineConfig(
            model=str(model),
            steps=2,
            size=64,
            device="cpu",
            local_files_only=True,
            assembly=PipelineAssembly(unet=str(unet), scheduler=TRAILING),
        )
    )
    assert pipeline.timesteps() == [999, 499]


def test_a_tiny_pipeline_folder_selects_what_the_loader_reads(tmp_path: Path) -> None:
    """The selection over a real saved folder (fp16 beside fp32) loads on its own."""
    full, kept = tmp_path / "full", tmp_path / "kept"
    pipe = build_tiny_family("sd-turbo")
    pipe.save_pretrained(full)
    pipe.save_pretrained(full, variant="fp16")
    files = [str(p.relative_to(full)) for p in full.rglob("*") if p.is_file()]
    index = json.loads((full / "model_index.json").read_text())
    chosen = select_pipeline_files(files, index, PipelineSelection(weights_variant="fp16"))
    assert all(".fp16." in f for f in chosen if f.endswith(".safetensors"))
    for name in chosen:
        (kept / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(full / name, kept / name)
    loaded = TextToImagePipeline.load(
        PipelineConfig(
            model=str(kept),
            size=64,
            device="cpu",
            assembly=PipelineAssembly(weights_variant="fp16"),
        )
    )
    assert loaded.generate(["a cat"], [0]).shape == (1, 3, 64, 64)
