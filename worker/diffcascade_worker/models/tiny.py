"""Tiny random-weight Stable Diffusion pipelines, built offline, for tests and the local demo.

They use the real diffusers classes (CLIP tokenizer and text encoder, UNet2DConditionModel,
AutoencoderKL, schedulers) at toy widths and are saved with `save_pretrained`, so the worker
loads them through the same `from_pretrained` path as a real model. "light" imitates a 1-step
turbo model (EulerAncestral, trailing spacing, no guidance); "heavy" a many-step model with
classifier-free guidance (DDIM). A `diffcascade.json` beside `model_index.json` records the
run settings, so `serve --model DIR` needs no flags. The light folder also gets a trained
tiny gate (`gate.pt`, light images vs heavy images) and its calibrated curve
(`defer_curve.json`). Everything is deterministic given the seed (at a fixed thread count).
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from diffcascade_worker.models.assembly import DEFAULTS_FILE as DEFAULTS_FILE
from diffcascade_worker.models.assembly import read_model_defaults as read_model_defaults

TinyKind = Literal["light", "heavy"]
TINY_KINDS: tuple[TinyKind, ...] = ("light", "heavy")
GATE_FILE = "gate.pt"
CURVE_FILE = "defer_curve.json"
TINY_SIZE = 64

#: Where the 10th and 90th percentiles of the light images' gate confidence land after
#: rescaling. A trained tiny gate is (correctly) sure every light image is a light one, so its
#: raw confidences sit near 0 and f(t) would be a step; an affine map of its logits (Platt
#: scaling, folded into the head, ranking unchanged) spreads them so thresholds in (0, 0.5)
#: defer a graded share, like DiffServe's SD-Turbo gate (f(0.01)=0.20, f(0.3)=0.79).
TARGET_CONFIDENCE_SPREAD = (0.01, 0.4)

_GATE_IMAGES_PER_CLASS = 32
_CALIBRATION_PROMPTS = 64


@dataclass(frozen=True)
class TinyDefaults:
    steps: int
    guidance_scale: float
    size: int = TINY_SIZE


TINY_DEFAULTS: dict[TinyKind, TinyDefaults] = {
    "light": TinyDefaults(steps=1, guidance_scale=0.0),
    "heavy": TinyDefaults(steps=8, guidance_scale=7.5),
}

_SUBJECTS = (
    "a cat", "a red bicycle", "an old lighthouse", "a bowl of ramen", "two dogs playing",
    "a city street at night", "a mountain lake", "a robot reading a book", "a vintage car",
    "a field of sunflowers", "a wooden cabin", "a clock tower", "a hand holding a cup",
    "a sailing boat", "a plate of fruit", "a snowy forest",
)  # fmt: skip
_STYLES = (
    "photo", "oil painting", "watercolor", "pencil sketch", "3d render", "at sunset",
    "in the rain", "close-up",
)  # fmt: skip


def tiny_prompts(count: int, *, offset: int = 0) -> list[str]:
    """Deterministic varied prompts (subject x style) for training and calibration."""
    combos = [f"{subject}, {style}" for style in _STYLES for subject in _SUBJECTS]
    return [combos[(offset + i) % len(combos)] for i in range(count)]


def _bytes_to_unicode() -> list[str]:
    """The GPT-2/CLIP byte -> printable character table."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def make_byte_tokenizer(*, max_length: int = 77) -> Any:
    """The real CLIPTokenizer class over a byte-level vocabulary (514 tokens, no merges)."""
    transformers: Any = importlib.import_module("transformers")
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length
    )


def build_tiny_pipeline(kind: TinyKind, *, seed: int = 0) -> Any:
    """An in-memory StableDiffusionPipeline with random weights drawn from `seed`."""
    diffusers: Any = importlib.import_module("diffusers")  # untyped: keep mypy out of it
    transformers: Any = importlib.import_module("transformers")

    if kind not in TINY_KINDS:
        raise ValueError(f"kind must be one of {TINY_KINDS}, got {kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = make_byte_tokenizer()
        vocab = len(tokenizer)
        channels: tuple[int, ...]
        if kind == "light":
            channels, per_block, text_dim, text_layers = (32, 64), 1, 32, 2
        else:
            channels, per_block, text_dim, text_layers = (32, 64, 64), 2, 64, 4
        levels = len(channels)
        unet = diffusers.UNet2DConditionModel(
            sample_size=TINY_SIZE // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=per_block,
            block_out_channels=channels,
            norm_num_groups=8,
            cross_attention_dim=text_dim,
            attention_head_dim=2,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        )
        vae = diffusers.AutoencoderKL(  # 4 levels: x8 downsampling like real SD
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=TINY_SIZE,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=text_dim,
                intermediate_size=2 * text_dim,
                num_hidden_layers=text_layers,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=vocab - 2,
                eos_token_id=vocab - 1,
                pad_token_id=vocab - 1,
            )
        )
    betas: dict[str, Any] = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
    }
    scheduler = (
        diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **betas)
        if kind == "light"
        else diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **betas)
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_model(kind: TinyKind, out_dir: Path, *, seed: int = 0) -> Path:
    """Build, save and describe a tiny pipeline in `out_dir` (returned).

    For "light" this also trains and calibrates the gate against the heavy model of the same
    seed, i.e. the one `make_tiny_model("heavy", ..., seed=seed)` writes.
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"kind must be one of {TINY_KINDS}, got {kind!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from diffcascade_worker.models.pipeline import quiet_progress_bars

    quiet_progress_bars()
    pipe = build_tiny_pipeline(kind, seed=seed)
    pipe.save_pretrained(out_dir)
    defaults = TINY_DEFAULTS[kind]
    record: dict[str, Any] = {
        "kind": kind,
        "seed": seed,
        "steps": defaults.steps,
        "guidanceScale": defaults.guidance_scale,
        "size": defaults.size,
    }
    if kind == "light":
        record.update(_make_tiny_gate(pipe, out_dir, seed=seed))
    (out_dir / DEFAULTS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out_dir


def _make_tiny_gate(light_pipe: Any, out_dir: Path, *, seed: int) -> dict[str, Any]:
    """Train the tiny gate on light vs heavy images, scale it, calibrate it; write both files."""
    from diffcascade_worker.gate.calibration import calibrate, write_curve
    from diffcascade_worker.gate.discriminators import DEFAULT_NORMALIZATION
    from diffcascade_worker.gate.scorer import Gate, save_checkpoint
    from diffcascade_worker.gate.training import (
        fold_logit_affine,
        real_margins,
        train_on_tensors,
    )
    from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline

    def wrap(pipe: Any, kind: TinyKind) -> TextToImagePipeline:
        d = TINY_DEFAULTS[kind]
        config = PipelineConfig(
            model=f"tiny-{kind}",
            steps=d.steps,
            guidance_scale=d.guidance_scale,
            size=d.size,
            device="cpu",
            dtype="float32",
        )
        return TextToImagePipeline(config, pipe, device="cpu", dtype=torch.float32)

    light = wrap(light_pipe, "light")
    heavy = wrap(build_tiny_pipeline("heavy", seed=seed), "heavy")
    n = _GATE_IMAGES_PER_CLASS
    prompts = tiny_prompts(n)
    seeds = [seed * 10_000 + i for i in range(n)]
    light_images = torch.cat(
        [light.generate(prompts[i : i + 16], seeds[i : i + 16]) for i in range(0, n, 16)]
    )
    heavy_images = torch.cat(
        [heavy.generate(prompts[i : i + 16], seeds[i : i + 16]) for i in range(0, n, 16)]
    )
    model, report = train_on_tensors(
        heavy_images, light_images, epochs=20, batch_size=24, lr=3e-3, seed=seed, device="cpu"
    )
    margins = sorted(real_margins(model, light_images, image_size=64))
    low, high = margins[len(margins) // 10], margins[(len(margins) * 9) // 10]
    want_low, want_high = (math.log(p / (1 - p)) for p in TARGET_CONFIDENCE_SPREAD)
    scale = (want_high - want_low) / (high - low) if high > low else 1.0
    shift = want_high - scale * high
    fold_logit_affine(model, scale=scale, shift=shift)
    gate_path = save_checkpoint(
        out_dir / GATE_FILE,
        model,
        architecture="tiny-cnn",
        image_size=64,
        normalization=DEFAULT_NORMALIZATION["tiny-cnn"],
    )
    gate = Gate.load(gate_path, device="cpu")
    curve = calibrate(
        light,
        gate,
        tiny_prompts(_CALIBRATION_PROMPTS, offset=n),
        seeds=seed * 10_000 + n,
        batch_size=16,
        model=out_dir.name,
        variant="tiny-light",
    )
    write_curve(out_dir / CURVE_FILE, curve)
    return {
        "gate": GATE_FILE,
        "deferCurve": CURVE_FILE,
        "gateHoldoutAccuracy": round(report.holdout_accuracy, 4),
        "gateLogitScale": round(scale, 6),
        "gateLogitShift": round(shift, 6),
    }


CLIP_IMAGE_SIZE = 32


def make_tiny_clip(out_dir: Path, *, seed: int = 0) -> Path:
    """A tiny random-weight transformers CLIPModel (the clip-score gate's weights), offline.

    Saved with `save_pretrained` beside its byte-level tokenizer, so `ClipScoreGate.load` reads
    it through the same `from_pretrained` path as openai/clip-vit-base-patch32. Random CLIP
    similarities sit near 0, not in the 0.15-0.35 of a trained one, so the calibration written
    beside it maps their 10th-90th percentiles (over random images and the tiny prompts) to
    [0, 1]; the gate then gives graded confidences, as a real CLIP with the default map does.
    """
    from diffcascade_worker.gate.clip import ClipCalibration, ClipScoreGate, write_calibration
    from diffcascade_worker.models.pipeline import quiet_progress_bars

    quiet_progress_bars()
    transformers: Any = importlib.import_module("transformers")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = make_byte_tokenizer()
        vocab = len(tokenizer)
        config = transformers.CLIPConfig(
            text_config={
                "vocab_size": vocab,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 77,
                "bos_token_id": vocab - 2,
                "eos_token_id": vocab - 1,
                "pad_token_id": vocab - 1,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": CLIP_IMAGE_SIZE,
                "patch_size": 8,
            },
            projection_dim=16,
        )
        model = transformers.CLIPModel(config).eval()
        noise = torch.rand(32, 3, TINY_SIZE, TINY_SIZE)
        smooth = torch.nn.functional.interpolate(  # low-frequency, like the tiny SD images
            torch.rand(32, 3, 8, 8), size=(TINY_SIZE, TINY_SIZE), mode="bilinear"
        )
        images = torch.cat([noise, smooth])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    gate = ClipScoreGate(
        model,
        tokenizer,
        calibration=ClipCalibration(low=-1.0, high=1.0),
        image_size=CLIP_IMAGE_SIZE,
        device="cpu",
    )
    sims = sorted(gate.similarities(images, tiny_prompts(len(images))))
    low, high = sims[len(sims) // 10], sims[(len(sims) * 9) // 10]
    if high <= low:
        low, high = low - 0.05, low + 0.05
    write_calibration(out_dir, ClipCalibration(low=round(low, 6), high=round(high, 6)))
    return out_dir
