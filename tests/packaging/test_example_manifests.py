"""The example cascades are what the docs say: admitted by the CRD and loaded by spec.py."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import click
import pytest
from diffcascade_operator.profiles import profiles_from_spec
from diffcascade_operator.spec import CascadeSpec, load_manifest
from packaging_support import EXAMPLES_DIR, REPO, admission_errors, load_yaml

pytest.importorskip("cel", reason="common-expression-language (dev extra) is not installed")

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
REFERENCE_LATENCY = REPO / "operator" / "diffcascade_operator" / "reference" / "latency_a100_ms.csv"


def _load(path: Path) -> tuple[dict[str, Any], CascadeSpec]:
    doc: dict[str, Any] = load_yaml(path)
    return doc, load_manifest(doc)[1]


GPU_EXAMPLES = ("sdturbo-sdv15.yaml", "sdxs-sdv15.yaml", "sdxl-lightning-sdxl.yaml")


def test_every_paper_cascade_and_the_tiny_one_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {*GPU_EXAMPLES, "tiny-cpu.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_admitted_by_the_crd(path: Path) -> None:
    assert admission_errors(load_yaml(path)) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads_with_spec_py(path: Path) -> None:
    doc, spec = _load(path)
    assert doc["apiVersion"] == "diffcascade.dev/v1alpha1"
    assert len(spec.variants) == 2


def _reference_latency() -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    with REFERENCE_LATENCY.open() as handle:
        for row in csv.DictReader(handle):
            table.setdefault(row["model"], {})[int(row["batch_size"])] = float(row["latency_ms"])
    return table


def test_gpu_example_is_the_papers_cascade() -> None:
    _, spec = _load(EXAMPLES_DIR / "sdturbo-sdv15.yaml")
    light, heavy = spec.variants
    assert (light.model, light.steps, light.guidance_scale, light.resolution) == (
        "hf://stabilityai/sd-turbo", 1, 0.0, 512,
    )  # fmt: skip
    assert (heavy.model, heavy.steps) == ("hf://stable-diffusion-v1-5/stable-diffusion-v1-5", 50)
    # Measured on the user's GPUs (profile.auto); the paper's A100 tables stand in until then.
    assert light.profile.auto and heavy.profile.auto
    reference = _reference_latency()
    assert light.profile.batch_latency_ms == reference["sd-turbo"]
    assert heavy.profile.batch_latency_ms == reference["sd-v1.5"]
    assert light.gate is not None and light.gate.discriminator is not None
    assert light.gate.discriminator.architecture == "clip-score"  # hub weights, no training
    assert (spec.gpu_budget, spec.slo_seconds) == (16, 5.0)
    assert all(v.resources == {"limits": {"nvidia.com/gpu": 1}} for v in spec.variants)


def test_gpu_example_reference_curves_are_bundled() -> None:
    _, spec = _load(EXAMPLES_DIR / "sdturbo-sdv15.yaml")
    profiles = profiles_from_spec(spec)
    assert len(profiles.variants) == 2


def test_tiny_example_matches_what_make_tiny_model_writes() -> None:
    from diffcascade_worker.models import tiny

    _, spec = _load(EXAMPLES_DIR / "tiny-cpu.yaml")
    light, heavy = spec.variants
    assert (light.model, heavy.model) == (".models/tiny-light", ".models/tiny-heavy")
    for variant, kind in zip((light, heavy), tiny.TINY_KINDS, strict=True):
        defaults = tiny.TINY_DEFAULTS[kind]
        assert (variant.steps, variant.guidance_scale) == (defaults.steps, defaults.guidance_scale)
        assert variant.resolution == defaults.size == tiny.TINY_SIZE
        assert max(variant.profile.batch_latency_ms) <= variant.max_batch_size
    assert light.gate is not None and light.gate.discriminator is not None
    assert light.gate.defer_curve is not None
    assert light.gate.discriminator.uri == f"{light.model}/{tiny.GATE_FILE}"
    assert light.gate.defer_curve.path == f"{light.model}/{tiny.CURVE_FILE}"


def test_tiny_example_needs_no_gpu() -> None:
    doc, spec = _load(EXAMPLES_DIR / "tiny-cpu.yaml")
    assert "nvidia.com/gpu" not in str(doc)
    floor = sum(v.min_replicas * v.gpus_per_replica for v in spec.variants)
    assert floor <= spec.gpu_budget == 4


# --- what the rendered pods fetch: exactly what their workers load ---------------------------

_TOKENIZER = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
_CLIP_GATE = {
    ".gitattributes", "README.md", "config.json", "merges.txt", "model.safetensors",
    "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json",
    "tokenizer_config.json", "vocab.json",
}  # fmt: skip
_SDXL_BASE = {
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model.fp16.safetensors",
    *(f"tokenizer/{f}" for f in _TOKENIZER), *(f"tokenizer_2/{f}" for f in _TOKENIZER),
    "unet/config.json", "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
}  # fmt: skip
_SD15_FP16 = {
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    *(f"tokenizer/{f}" for f in _TOKENIZER),
    "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
}  # fmt: skip
_SD_TURBO_FP16 = {
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.fp16.safetensors",
    *(f"tokenizer/{f}" for f in _TOKENIZER),
    "unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
}  # fmt: skip
_SDXS = {  # no fp16 files in this repo; vae_large is never loaded
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    *(f"tokenizer/{f}" for f in _TOKENIZER),
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
}  # fmt: skip
EXPECTED_FETCH: dict[tuple[str, int], dict[str, set[str]]] = {
    ("sdturbo-sdv15.yaml", 0): {
        "hf://stabilityai/sd-turbo": _SD_TURBO_FP16,
        "hf://openai/clip-vit-base-patch32": _CLIP_GATE,
    },
    ("sdturbo-sdv15.yaml", 1): {"hf://stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15_FP16},
    ("sdxs-sdv15.yaml", 0): {
        "hf://IDKiro/sdxs-512-0.9": _SDXS,
        "hf://openai/clip-vit-base-patch32": _CLIP_GATE,
    },
    ("sdxs-sdv15.yaml", 1): {"hf://stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15_FP16},
    ("sdxl-lightning-sdxl.yaml", 0): {
        "hf://stabilityai/stable-diffusion-xl-base-1.0": _SDXL_BASE,  # no UNet weights
        "hf://ByteDance/SDXL-Lightning/sdxl_lightning_2step_unet.safetensors": {
            "sdxl_lightning_2step_unet.safetensors"
        },
        "hf://openai/clip-vit-base-patch32": _CLIP_GATE,
    },
    ("sdxl-lightning-sdxl.yaml", 1): {
        "hf://stabilityai/stable-diffusion-xl-base-1.0": _SDXL_BASE
        | {"unet/diffusion_pytorch_model.fp16.safetensors"}
    },
}


def _pod(spec: CascadeSpec, index: int) -> dict[str, Any]:
    from diffcascade_operator.kube import manifests
    from diffcascade_operator.kube.settings import OperatorSettings

    dep = manifests.deployment(
        cascade="c", namespace="n", spec=spec, index=index, replicas=1, settings=OperatorSettings()
    )
    pod: dict[str, Any] = dep["spec"]["template"]["spec"]
    return pod


def what_fetch_downloads(init_args: list[str]) -> dict[str, set[str]]:
    """The init container's arguments, read by the real `fetch` command's parser and planned by
    its own code, against the recorded hub listings (no hub here)."""
    from diffcascade_worker.storage.fetch_command import fetch_command, plan_fetch
    from diffcascade_worker.storage.uris import Scheme, hub_selection
    from hub_listings import REPOS

    assert init_args[:2] == ["fetch", "--cache-dir=/models"]
    params = fetch_command.make_context("fetch", list(init_args[1:])).params
    plan = plan_fetch(
        params["uris"],
        model=params["model"],
        unet=params["unet"],
        weights_variant=params["weights_variant"],
        safety_checker=params["safety_checker"],
    )
    out = {}
    for uri, selection in plan:
        assert uri.scheme is Scheme.HF, uri.raw
        files, index = REPOS[uri.path]
        listing: dict[str, int | None] = dict.fromkeys(files)
        out[uri.raw] = set(hub_selection(uri, listing, selection=selection, model_index=index))
    return out


@pytest.mark.parametrize(
    ("example", "index"),
    sorted(EXPECTED_FETCH),
    ids=[f"{e}-{i}" for e, i in sorted(EXPECTED_FETCH)],
)
def test_example_pods_fetch_exactly_what_their_workers_load(example: str, index: int) -> None:
    from diffcascade_operator.kube import profiling
    from diffcascade_operator.kube.settings import OperatorSettings
    from diffcascade_worker.storage.uris import local_path

    _, spec = _load(EXAMPLES_DIR / example)
    variant = spec.variants[index]
    pod = _pod(spec, index)
    [init] = pod["initContainers"]
    assert what_fetch_downloads(init["args"]) == EXPECTED_FETCH[(example, index)]
    worker = pod["containers"][0]["args"]
    assert f"--model={local_path(variant.model)}" in worker
    if variant.unet is not None:  # the one file fetched is the one loaded, from the cache
        assert f"--unet={local_path(variant.unet)}" in worker
    if variant.weights_variant is not None:
        assert f"--weights-variant={variant.weights_variant}" in worker
    assert "--safety-checker" not in worker  # off by default, and so never fetched
    # The profiling Job fetches the same files and measures the same assembled pipeline.
    settings = OperatorSettings()
    job = profiling.profile_job(
        cascade="c",
        namespace="n",
        spec=spec,
        index=index,
        key=profiling.profile_key(spec, variant, settings),
        settings=settings,
    )
    job_pod = job["spec"]["template"]["spec"]
    assert job_pod["initContainers"][0]["args"] == init["args"]
    assembly = [a for a in worker if a.startswith(("--unet", "--scheduler", "--weights-variant"))]
    assert all(a in job_pod["containers"][0]["args"] for a in assembly)


def test_the_lightning_example_assembles_sdxl_base_a_unet_file_and_trailing_euler() -> None:
    _, spec = _load(EXAMPLES_DIR / "sdxl-lightning-sdxl.yaml")
    light, heavy = spec.variants
    assert light.model == heavy.model == "hf://stabilityai/stable-diffusion-xl-base-1.0"
    assert light.unet == "hf://ByteDance/SDXL-Lightning/sdxl_lightning_2step_unet.safetensors"
    assert light.scheduler is not None
    assert light.scheduler.class_name == "EulerDiscreteScheduler"
    assert light.scheduler.config == {"timestep_spacing": "trailing"}
    assert (light.steps, light.guidance_scale, light.resolution) == (2, 0.0, 1024)
    worker = _pod(spec, 0)["containers"][0]["args"]
    assert "--scheduler=EulerDiscreteScheduler" in worker
    assert '--scheduler-config={"timestep_spacing":"trailing"}' in worker
    assert (heavy.steps, heavy.guidance_scale, heavy.scheduler, heavy.unet) == (50, 5.0, None, None)


@pytest.mark.parametrize("example", GPU_EXAMPLES)
def test_gpu_examples_gate_every_deferring_stage_without_training(example: str) -> None:
    _, spec = _load(EXAMPLES_DIR / example)
    light = spec.variants[0]
    assert light.gate is not None and light.gate.discriminator is not None
    assert light.gate.discriminator.architecture == "clip-score"
    assert all(v.profile.auto for v in spec.variants)
    assert not spec.simulator_only
    assert not any("runwayml" in v.model for v in spec.variants)  # left the hub in 2024


def _commands_in(text: str) -> list[str]:
    return re.findall(r"`diffcascade ([^`]+)`", text)


@pytest.mark.parametrize("path", sorted(EXAMPLES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_diffcascade_command_an_example_mentions_exists_and_parses(path: Path) -> None:
    import shlex

    from diffcascade_operator.cli import main

    for line in _commands_in(path.read_text()):
        name, *args = shlex.split(line)
        command = main.get_command(click.Context(main), name)
        assert command is not None, f"{path.name}: no command `diffcascade {name}`"
        with command.make_context(name, args):  # raises on an unknown option
            pass
