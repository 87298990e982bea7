"""Training a gate discriminator: real/good images (class 1) against generated ones (class 0).

The DiffServe recipe labels ground-truth photos "real" and light- and heavy-model outputs
"fake". Without photos (offline tests, the tiny demo) heavy-model images stand in for "real":
the tiny light and heavy pipelines have clearly different texture statistics, so the task is
learnable in seconds on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffcascade_worker.gate.discriminators import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NORMALIZATION,
    REAL_CLASS,
    Architecture,
    build_discriminator,
    prepare_input,
)
from diffcascade_worker.gate.scorer import save_checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TrainingDataError(ValueError):
    """The image folders cannot be used for training (missing, empty, unreadable)."""


@dataclass(frozen=True)
class TrainReport:
    architecture: Architecture
    train_images: int
    holdout_images: int
    holdout_accuracy: float  # share of held-out images classified right at p = 0.5
    epochs: int
    seconds: float
    out_path: Path | None = None


def load_image_folder(
    folder: Path, *, image_size: int, limit: int | None = None, as_uint8: bool = False
) -> torch.Tensor:
    """All images in a folder (sorted by name), resized to a square: (N, 3, S, S).

    Float in [0, 1] by default; `as_uint8` keeps 8-bit pixels (a quarter of the memory), which
    the training loop converts batch by batch.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingDataError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise TrainingDataError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    tensors = []
    for file in files:
        try:
            with Image.open(file) as img:
                rgb = img.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
                array = np.asarray(rgb, dtype=np.uint8).copy()
        except (OSError, UnidentifiedImageError) as error:
            raise TrainingDataError(f"cannot read image {file}: {error}") from error
        tensors.append(torch.from_numpy(array).permute(2, 0, 1))
    stacked = torch.stack(tensors)
    return stacked if as_uint8 else stacked.float() / 255.0


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def save_image_folder(images: torch.Tensor, folder: Path, *, prefix: str = "img") -> list[Path]:
    """Write (N, 3, H, W) [0, 1] images as numbered PNG files."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    pixels = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    for index, image in enumerate(pixels):
        path = folder / f"{prefix}-{index:05d}.png"
        Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)
        paths.append(path)
    return paths


def load_initial_weights(model: nn.Module, path: Path) -> int:
    """Start from pretrained weights (e.g. torchvision's ImageNet efficientnet_v2_s file).

    Every tensor but the final linear head must be present with the same shape; the head is
    taken when it fits (same class count) and left freshly initialised otherwise, which is how
    DiffServe swaps the 1000-class head for a two-class one. Returns the tensors loaded.
    """
    try:
        raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingDataError(f"cannot read initial weights {path}: {error}") from error
    state = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
    if not isinstance(state, Mapping):
        raise TrainingDataError(f"initial weights {path} hold no state_dict")
    head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    own = model.state_dict()
    usable = {
        k: v
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape
    }
    missing = [k for k in own if k not in usable and not k.startswith(head + ".")]
    if missing:
        raise TrainingDataError(
            f"initial weights {path} do not fit this architecture: {len(missing)} tensors "
            f"missing or of another shape (first: {missing[0]})"
        )
    model.load_state_dict(usable, strict=False)
    return len(usable)


def train_on_tensors(
    real: torch.Tensor,
    generated: torch.Tensor,
    *,
    architecture: Architecture = "tiny-cnn",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 3e-3,
    image_size: int | None = None,
    seed: int = 0,
    holdout_fraction: float = 0.25,
    init_from: Path | None = None,
    device: str | None = None,
) -> tuple[nn.Module, TrainReport]:
    """Train a fresh network; returns it on the CPU in eval mode with its held-out accuracy.

    Images are (N, 3, H, W), float in [0, 1] or uint8; they are resized and normalised one
    batch at a time, so a large uint8 set never exists as float in memory.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError("holdout_fraction must lie in [0, 1)")
    if len(real) < 2 or len(generated) < 2:
        raise TrainingDataError("need at least two real and two generated images")
    size = image_size or DEFAULT_IMAGE_SIZE[architecture]
    normalization = DEFAULT_NORMALIZATION[architecture]
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_discriminator(architecture)
        if init_from is not None:
            load_initial_weights(model, init_from)
        model.to(target)

        def split(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            order = torch.randperm(len(images), generator=generator)
            n_hold = round(len(images) * holdout_fraction) if holdout_fraction else 0
            n_hold = min(max(n_hold, 1 if holdout_fraction else 0), len(images) - 1)
            return images[order[n_hold:]], images[order[:n_hold]]

        real_train, real_hold = split(real)
        gen_train, gen_hold = split(generated)
        if real.dtype == generated.dtype == torch.uint8:
            x_train = torch.cat([real_train, gen_train])  # stays 8-bit until batched
        else:
            x_train = torch.cat([_as_unit_float(real_train), _as_unit_float(gen_train)])
        y_train = torch.cat(
            [
                torch.full((len(real_train),), REAL_CLASS),
                torch.full((len(gen_train),), 1 - REAL_CLASS),
            ]
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                if len(batch) < 2 and architecture == "efficientnet_v2_s":
                    continue  # BatchNorm needs more than one sample
                x = prepare_input(
                    _as_unit_float(x_train[batch]).to(target),
                    image_size=size,
                    normalization=normalization,
                )
                loss = F.cross_entropy(model(x), y_train[batch].to(target))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
        model.eval()
        accuracy = float("nan")
        if len(real_hold) and len(gen_hold):
            accuracy = holdout_accuracy(
                model, real_hold, gen_hold, image_size=size, architecture=architecture
            )
        model.to("cpu")
    report = TrainReport(
        architecture=architecture,
        train_images=len(x_train),
        holdout_images=len(real_hold) + len(gen_hold),
        holdout_accuracy=accuracy,
        epochs=epochs,
        seconds=time.perf_counter() - started,
    )
    return model, report


def holdout_accuracy(
    model: nn.Module,
    real: torch.Tensor,
    generated: torch.Tensor,
    *,
    image_size: int,
    architecture: Architecture,
    batch_size: int = 64,
) -> float:
    """Balanced accuracy: the mean of the per-class hit rates at p(real) = 0.5."""
    normalization = DEFAULT_NORMALIZATION[architecture]
    device = next(model.parameters()).device
    rates = []
    with torch.inference_mode():
        for images, label in ((real, REAL_CLASS), (generated, 1 - REAL_CLASS)):
            hits = 0
            for start in range(0, len(images), batch_size):
                x = prepare_input(
                    _as_unit_float(images[start : start + batch_size]).to(device),
                    image_size=image_size,
                    normalization=normalization,
                )
                hits += int((model(x).argmax(dim=1) == label).sum())
            rates.append(hits / len(images))
    return sum(rates) / len(rates)


def fold_logit_affine(model: nn.Module, *, scale: float, shift: float) -> None:
    """Make the two-class head output margin' = scale * margin + shift, in place.

    margin = logit(real) - logit(generated); softmax then gives sigmoid(margin'). Folding
    the map into the final linear layer keeps the checkpoint format unchanged and the
    ranking of images unchanged (scale > 0): it is Platt scaling stored in the weights.
    """
    if scale <= 0:
        raise ValueError("scale must be > 0 (a negative one would invert the gate)")
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if head.out_features != 2 or head.bias is None:
        raise ValueError("expected a two-class linear head with a bias")
    with torch.no_grad():
        head.weight.mul_(scale)
        head.bias.mul_(scale)
        head.bias[REAL_CLASS] += shift


def real_margins(
    model: nn.Module,
    images: torch.Tensor,
    *,
    image_size: int,
    architecture: Architecture = "tiny-cnn",
) -> list[float]:
    """logit(real) - logit(generated) per image (the pre-softmax confidence)."""
    normalization = DEFAULT_NORMALIZATION[architecture]
    with torch.inference_mode():
        logits = model(prepare_input(images, image_size=image_size, normalization=normalization))
    return [float(v) for v in logits[:, REAL_CLASS] - logits[:, 1 - REAL_CLASS]]


def train_discriminator(
    real_dir: Path,
    generated_dir: Path,
    *,
    architecture: Architecture = "tiny-cnn",
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 3e-3,
    image_size: int | None = None,
    seed: int = 0,
    out_path: Path,
    limit: int | None = None,
    init_from: Path | None = None,
    device: str | None = None,
) -> TrainReport:
    """Train on two image folders and write the gate checkpoint to `out_path`."""
    size = image_size or DEFAULT_IMAGE_SIZE[architecture]
    real = load_image_folder(real_dir, image_size=size, limit=limit, as_uint8=True)
    generated = load_image_folder(generated_dir, image_size=size, limit=limit, as_uint8=True)
    model, report = train_on_tensors(
        real,
        generated,
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        image_size=size,
        seed=seed,
        init_from=init_from,
        device=device,
    )
    save_checkpoint(
        out_path,
        model,
        architecture=architecture,
        image_size=size,
        normalization=DEFAULT_NORMALIZATION[architecture],
    )
    return TrainReport(**{**report.__dict__, "out_path": Path(out_path)})


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
