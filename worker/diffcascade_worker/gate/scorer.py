"""The gate: a discriminator that scores light-model images, and the deferral rule.

Confidence is the discriminator's softmax probability of the real/good class. A query is
deferred to the next stage when its confidence is below the threshold; a threshold of 1.0 or
more defers everything (even a confidence of exactly 1), so the control plane's two ends of the
range mean "defer nothing" (0) and "defer all" (1). `should_defer` is that rule, used by both
serving and calibration, so the curve f(t) the allocator plans with is the one the worker runs.

Checkpoint format (a `torch.save`d dict, loadable with `weights_only=True`):
    {"architecture": "tiny-cnn" | "efficientnet_v2_s", "state_dict": {...}, "image_size": int,
     "normalization": {"mean": [...], "std": [...]}, "version": 1}
A bare torchvision `efficientnet_v2_s` state_dict with a two-class head is accepted too.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcascade_worker.deferral import should_defer as should_defer  # re-exported
from diffcascade_worker.gate.discriminators import (
    ARCHITECTURES,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NORMALIZATION,
    REAL_CLASS,
    Architecture,
    Normalization,
    build_discriminator,
    prepare_input,
)

CHECKPOINT_VERSION = 1


class GateLoadError(RuntimeError):
    """A gate checkpoint is missing, unreadable or of an unknown architecture."""


class Gate:
    """A loaded discriminator in eval mode, scoring batches of [0, 1] images."""

    def __init__(
        self,
        model: nn.Module,
        *,
        architecture: Architecture,
        image_size: int,
        normalization: Normalization,
        device: str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.architecture: Architecture = architecture
        self.image_size = image_size
        self.normalization = normalization
        self.device = device
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, *, device: str | None = None) -> Gate:
        """Read a checkpoint written by `save_checkpoint` (or a bare v2_s state_dict)."""
        path = Path(path)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise GateLoadError(f"gate checkpoint {path} {what}")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise GateLoadError(
                f"gate checkpoint {path} is not a readable torch file: {error}"
            ) from error
        checkpoint = _normalise_checkpoint(raw, path)
        architecture = checkpoint["architecture"]
        model = build_discriminator(architecture)
        try:
            model.load_state_dict(checkpoint["state_dict"], strict=True)
        except Exception as error:
            raise GateLoadError(
                f"gate checkpoint {path} does not match architecture {architecture}: {error}"
            ) from error
        resolved = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            model,
            architecture=architecture,
            image_size=checkpoint["image_size"],
            normalization=checkpoint["normalization"],
            device=resolved,
        )

    def score(self, images: torch.Tensor, *, prompts: Sequence[str] | None = None) -> list[float]:
        """Confidence in [0, 1], per image, that it is good enough (P(real/good class)).

        `prompts` is accepted for the gate interface (the clip-score gate needs them) and unused.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            return []
        x = prepare_input(
            images.to(self.device), image_size=self.image_size, normalization=self.normalization
        )
        with self._lock, torch.inference_mode():
            logits = self.model(x)
        probs = torch.softmax(logits.float(), dim=1)[:, REAL_CLASS]
        scores: list[float] = probs.clamp(0.0, 1.0).cpu().tolist()  # one call, not one per image
        return scores


def load_gate(path: Path, *, device: str | None = None) -> Any:
    """The gate at `path`: a CLIP model folder is the clip-score gate, a file a checkpoint."""
    path = Path(path)
    if path.is_dir():
        from diffcascade_worker.gate.clip import ClipGateError, ClipScoreGate

        try:
            return ClipScoreGate.load(path, device=device)
        except ClipGateError as error:
            raise GateLoadError(str(error)) from error
    return Gate.load(path, device=device)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    architecture: Architecture,
    image_size: int,
    normalization: Normalization,
) -> Path:
    """Write the gate checkpoint format; tensors are moved to CPU first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(
        {
            "architecture": architecture,
            "state_dict": state,
            "image_size": int(image_size),
            "normalization": normalization.to_dict(),
            "version": CHECKPOINT_VERSION,
        },
        path,
    )
    return path


def _normalise_checkpoint(raw: Any, path: Path) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise GateLoadError(f"gate checkpoint {path} holds {type(raw).__name__}, not a dict")
    if "architecture" not in raw:
        if "classifier.1.weight" in raw and "features.0.0.weight" in raw:
            raw = {"architecture": "efficientnet_v2_s", "state_dict": raw}  # bare torchvision
        else:
            raise GateLoadError(
                f"gate checkpoint {path} has no 'architecture' key (expected keys: "
                "architecture, state_dict, image_size, normalization, version)"
            )
    architecture = raw["architecture"]
    if architecture not in ARCHITECTURES:
        raise GateLoadError(
            f"gate checkpoint {path}: unknown architecture {architecture!r}; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    version = raw.get("version", CHECKPOINT_VERSION)
    if version != CHECKPOINT_VERSION:
        raise GateLoadError(f"gate checkpoint {path}: unsupported version {version!r}")
    state_dict = raw.get("state_dict")
    if not isinstance(state_dict, Mapping):
        raise GateLoadError(f"gate checkpoint {path} has no state_dict")
    image_size = raw.get("image_size", DEFAULT_IMAGE_SIZE[architecture])
    if not isinstance(image_size, int) or not 8 <= image_size <= 4096:
        raise GateLoadError(f"gate checkpoint {path}: bad image_size {image_size!r}")
    norm_raw = raw.get("normalization")
    normalization = DEFAULT_NORMALIZATION[architecture]
    if norm_raw is not None:
        try:
            mean = tuple(float(v) for v in norm_raw["mean"])
            std = tuple(float(v) for v in norm_raw["std"])
        except (KeyError, TypeError, ValueError) as error:
            raise GateLoadError(f"gate checkpoint {path}: bad normalization: {error}") from error
        if len(mean) not in (1, 3) or len(std) != len(mean) or any(s <= 0 for s in std):
            raise GateLoadError(f"gate checkpoint {path}: bad normalization {norm_raw!r}")
        normalization = Normalization(mean=mean, std=std)
    return {
        "architecture": architecture,
        "state_dict": state_dict,
        "image_size": image_size,
        "normalization": normalization,
    }
