"""CLI commands for the model side: build tiny models, train and calibrate the gate."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from diffcascade_worker.models.assembly import (
    PipelineAssembly,
    assembly_from_options,
    assembly_options,
)
from diffcascade_worker.protocol import MAX_BATCH_SIZE

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_ARCHITECTURES = ("tiny-cnn", "efficientnet_v2_s")


def _threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("DIFFCASCADE_TORCH_THREADS", "1")))


@click.command("make-tiny-model")
@click.option(
    "--kind",
    type=click.Choice(["light", "heavy", "clip"]),
    required=True,
    help="light: 1-step turbo-like (with a trained gate); heavy: many-step DDIM with guidance; "
    "clip: a CLIP model for the clip-score gate.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
def make_tiny_model(kind: str, seed: int, out_dir: Path) -> None:
    """Build a tiny random-weight SD pipeline offline and save it to OUT_DIR."""
    from diffcascade_worker.models.assembly import read_model_defaults
    from diffcascade_worker.models.tiny import make_tiny_model as build

    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").exists():
        raise click.UsageError(f"{out_dir} exists and is not empty (and not a model folder)")
    _threads()
    started = time.perf_counter()
    if kind == "clip":
        from diffcascade_worker.models.tiny import make_tiny_clip

        make_tiny_clip(out_dir, seed=seed)
        click.echo(f"wrote a tiny CLIP (clip-score gate) to {out_dir}")
        return
    folder = build("light" if kind == "light" else "heavy", out_dir, seed=seed)
    defaults = read_model_defaults(folder)
    click.echo(
        f"wrote {kind} model to {folder} in {time.perf_counter() - started:.1f} s "
        f"(steps={defaults['steps']}, guidance={defaults['guidance_scale']}, "
        f"size={defaults['size']})"
    )
    if "gate" in defaults:
        click.echo(f"gate: {defaults['gate']}  defer curve: {defaults['defer_curve']}")


@click.group("gate")
def gate() -> None:
    """Train and calibrate the discriminator that decides deferrals."""


@gate.command("train")
@click.option(
    "--real",
    "real_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Folder of real/good images (class 1).",
)
@click.option(
    "--generated",
    "generated_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Folder of generated images (class 0).",
)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--architecture", type=click.Choice(_ARCHITECTURES), default="tiny-cnn", show_default=True
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True)
@click.option(
    "--image-size",
    type=click.IntRange(min=8, max=1024),
    default=None,
    help="Network input size [default: 64 for tiny-cnn, 224 for efficientnet_v2_s].",
)
@click.option("--limit", type=click.IntRange(min=2), default=None, help="Images per folder.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--init",
    "init_from",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Pretrained weights to start from (e.g. torchvision's efficientnet_v2_s ImageNet "
    "file); the classification head is replaced when its class count differs.",
)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: auto]")
def train(
    real_dir: Path,
    generated_dir: Path,
    out_path: Path,
    architecture: str,
    epochs: int,
    batch_size: int,
    lr: float,
    image_size: int | None,
    limit: int | None,
    seed: int,
    init_from: Path | None,
    device: str | None,
) -> None:
    """Train a real-vs-generated discriminator and write a gate checkpoint."""
    from diffcascade_worker.gate.training import TrainingDataError, train_discriminator

    _threads()
    try:
        report = train_discriminator(
            real_dir,
            generated_dir,
            architecture="efficientnet_v2_s" if architecture == "efficientnet_v2_s" else "tiny-cnn",
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            image_size=image_size,
            seed=seed,
            out_path=out_path,
            limit=limit,
            init_from=init_from,
            device=device,
        )
    except TrainingDataError as error:
        raise click.UsageError(str(error)) from error
    click.echo(
        f"trained {report.architecture} on {report.train_images} images in "
        f"{report.seconds:.1f} s; held-out accuracy {report.holdout_accuracy:.3f} "
        f"on {report.holdout_images} images; wrote {out_path}"
    )


def read_prompts(path: Path, *, limit: int | None = None) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    prompts = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return prompts[:limit] if limit is not None else prompts


@gate.command("calibrate")
@click.option("--model", required=True, help="Model folder or hub id of the gated (light) variant.")
@click.option(
    "--gate",
    "gate_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
)
@click.option(
    "--prompts",
    "prompts_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Text file, one prompt per line.",
)
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@click.option("--steps", type=click.IntRange(min=1, max=1000), default=None)
@click.option("--guidance-scale", type=click.FloatRange(min=0, max=50), default=None)
@click.option("--size", type=click.IntRange(min=8, max=4096), default=None)
@click.option(
    "--batch-size", type=click.IntRange(min=1, max=MAX_BATCH_SIZE), default=8, show_default=True
)
@click.option(
    "--images-per-prompt", type=click.IntRange(min=1, max=16), default=1, show_default=True
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--variant", default=None, help="Variant name recorded in the curve file.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: auto]")
@assembly_options()
def calibrate_command(
    model: str,
    gate_path: Path,
    prompts_path: Path,
    out_path: Path,
    limit: int | None,
    steps: int | None,
    guidance_scale: float | None,
    size: int | None,
    batch_size: int,
    images_per_prompt: int,
    seed: int,
    variant: str | None,
    device: str | None,
    unet: str | None,
    weights_variant: str | None,
    safety_checker: bool | None,
    scheduler: str | None,
    scheduler_config: str | None,
) -> None:
    """Score the model's images of PROMPTS with the gate and write the curve f(t)."""
    from diffcascade_worker.gate.calibration import calibrate, write_curve
    from diffcascade_worker.gate.scorer import Gate, GateLoadError
    from diffcascade_worker.gate.training import median
    from diffcascade_worker.models.assembly import read_model_defaults
    from diffcascade_worker.models.pipeline import (
        ModelLoadError,
        PipelineConfig,
        TextToImagePipeline,
    )

    assembly = assembly_from_options(
        unet=unet,
        scheduler=scheduler,
        scheduler_config=scheduler_config,
        weights_variant=weights_variant,
        safety_checker=safety_checker,
    )
    prompts = read_prompts(prompts_path, limit=limit)
    if not prompts:
        raise click.UsageError(f"{prompts_path} holds no prompts")
    try:
        defaults: dict[str, Any] = read_model_defaults(model) if Path(model).is_dir() else {}
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    config = PipelineConfig(
        model=model,
        steps=steps if steps is not None else defaults.get("steps", 1),
        guidance_scale=(
            guidance_scale if guidance_scale is not None else defaults.get("guidance_scale", 0.0)
        ),
        size=size if size is not None else defaults.get("size", 512),
        device=device,
        assembly=assembly.over(defaults.get("assembly") or PipelineAssembly()),
    )
    _threads()
    try:
        gate_model = Gate.load(gate_path, device=device)
        pipeline = TextToImagePipeline.load(config)
    except (GateLoadError, ModelLoadError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    started = time.perf_counter()
    curve = calibrate(
        pipeline,
        gate_model,
        prompts,
        seeds=seed,
        batch_size=batch_size,
        images_per_prompt=images_per_prompt,
        model=model,
        variant=variant,
    )
    write_curve(out_path, curve)
    click.echo(
        f"calibrated {curve.prompts} prompts in {time.perf_counter() - started:.1f} s: "
        f"f(0.1)={curve.defer_fraction(0.1):.3f} f(0.5)={curve.defer_fraction(0.5):.3f} "
        f"median confidence {median(curve.confidences):.3f}; wrote {out_path}"
    )
