"""`diffcascade-worker profile`: the batch latency table (and f(t)) on this machine's GPU.

Run by hand, or by the operator as a Job per variant (`spec.variants[].profile.auto`), which
passes `--termination-message`: the compact result goes to /dev/termination-log, where the
operator reads it from the pod's status and stores it in a ConfigMap.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import click

from diffcascade_worker.models.assembly import (
    PipelineAssembly,
    assembly_from_options,
    assembly_options,
)
from diffcascade_worker.protocol import MAX_BATCH_SIZE

DEFAULT_PROMPT_LIMIT = 200


def bundled_prompts() -> Path | None:
    """The 1,000 DiffusionDB prompts shipped with diffcascade (found without importing it)."""
    spec = importlib.util.find_spec("diffcascade_operator")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "local" / "prompts.txt"
    return path if path.is_file() else None


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise click.BadParameter(f"{text!r}: batch sizes are comma-separated integers") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_BATCH_SIZE:
        raise click.BadParameter(f"{text!r}: batch sizes between 1 and {MAX_BATCH_SIZE}")
    return sizes


@click.command("profile")
@click.option("--model", required=True, help="Model folder (or hub id in the local cache).")
@click.option(
    "--gate",
    "gate_path",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Gate checkpoint or CLIP folder: also measure the deferral curve f(t).",
)
@click.option("--batch-sizes", default="1,2,4,8,16", show_default=True)
@click.option(
    "--prompts",
    "prompts_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="One prompt per line [default: the bundled DiffusionDB prompts].",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=DEFAULT_PROMPT_LIMIT,
    show_default=True,
    help="Prompts used for f(t).",
)
@click.option("--steps", type=click.IntRange(min=1, max=1000), default=None)
@click.option("--guidance-scale", type=click.FloatRange(min=0, max=50), default=None)
@click.option("--size", type=click.IntRange(min=8, max=4096), default=None)
@click.option("--repeats", type=click.IntRange(min=1, max=100), default=3, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0, max=10), default=1, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--variant", default=None, help="Variant name recorded in the result.")
@click.option("--key", default=None, help="Opaque key recorded in the result (the operator's).")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... [default: auto]")
@click.option("--dtype", default=None, help="float32, float16 ... [default: fp16 on GPU]")
@assembly_options()
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--termination-message",
    "termination_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the compact result here (a Job's /dev/termination-log).",
)
def profile(
    *,
    model: str,
    gate_path: Path | None,
    batch_sizes: str,
    prompts_path: Path | None,
    limit: int,
    steps: int | None,
    guidance_scale: float | None,
    size: int | None,
    repeats: int,
    warmup: int,
    seed: int,
    variant: str | None,
    key: str | None,
    device: str | None,
    dtype: str | None,
    unet: str | None,
    weights_variant: str | None,
    safety_checker: bool | None,
    scheduler: str | None,
    scheduler_config: str | None,
    out_path: Path | None,
    termination_path: Path | None,
) -> None:
    """Measure the batch latency table on this machine and, with --gate, the curve f(t)."""
    from diffcascade_worker.models.model_commands import read_prompts

    assembly = assembly_from_options(
        unet=unet,
        scheduler=scheduler,
        scheduler_config=scheduler_config,
        weights_variant=weights_variant,
        safety_checker=safety_checker,
    )
    sizes = parse_batch_sizes(batch_sizes)
    source = prompts_path or bundled_prompts()
    if source is None:
        raise click.UsageError("no --prompts given and no bundled prompts found")
    prompts = read_prompts(source, limit=limit)
    if not prompts:
        raise click.UsageError(f"{source} holds no prompts")

    import torch

    from diffcascade_worker.gate.scorer import GateLoadError, load_gate
    from diffcascade_worker.models.engine import model_defaults
    from diffcascade_worker.models.pipeline import (
        ModelLoadError,
        PipelineConfig,
        TextToImagePipeline,
    )
    from diffcascade_worker.models.profiling import profile_variant

    torch.set_num_threads(int(os.environ.get("DIFFCASCADE_TORCH_THREADS", "1")))
    try:
        defaults: dict[str, Any] = model_defaults(model)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    config = PipelineConfig(
        model=model,
        steps=steps if steps is not None else defaults.get("steps", 1),
        guidance_scale=(
            guidance_scale if guidance_scale is not None else defaults.get("guidance_scale", 0.0)
        ),
        size=size if size is not None else defaults.get("size", 512),
        device=device,
        dtype=dtype,
        assembly=assembly.over(defaults.get("assembly") or PipelineAssembly()),
    )
    try:
        pipeline = TextToImagePipeline.load(config)
        gate = load_gate(gate_path, device=pipeline.device) if gate_path is not None else None
    except (GateLoadError, ModelLoadError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    result = profile_variant(
        pipeline,
        gate,
        prompts,
        batch_sizes=sizes,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        model=model,
        steps=config.steps,
        guidance_scale=config.guidance_scale,
        size=config.size,
        device=pipeline.device,
        variant=variant,
        key=key,
    )
    click.echo(pipeline.describe())
    table = ", ".join(f"{b}: {ms:.1f}" for b, ms in result.batch_latency_ms.items())
    click.echo(f"batch latency ms on {result.accelerator or result.device}: {table}")
    if result.confidences:
        from diffcascade_worker.deferral import curve_from_confidences

        curve = curve_from_confidences(result.confidences)
        click.echo(
            f"f(t) over {result.prompts} prompts: f(0.1)={curve.at(0.1):.3f} "
            f"f(0.3)={curve.at(0.3):.3f} f(0.5)={curve.at(0.5):.3f}"
        )
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result.to_json(), indent=1) + "\n")
        click.echo(f"wrote {out_path}")
    if termination_path is not None:
        termination_path.write_text(result.compact_json())
