"""The compute side of a worker seen by the serving code: one batch in, images and scores out.

The batcher and the service only know the `Engine` protocol, so they never import torch and
can be tested with a fake. `DiffusersEngine` is the real one: a diffusers pipeline plus, on a
gated stage, the discriminator that scores every image of the batch in the same thread.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from diffcascade_worker.serving.settings import WorkerSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchOutput:
    """Images of one batch, in request order, with the gate's confidences (None: no gate)
    and what the pipeline's safety checker flagged (None: none ran)."""

    images: Sequence[Any]
    confidences: Sequence[float] | None
    flagged: Sequence[bool] | None = None


class Engine(Protocol):
    """What the batcher runs, always from one dedicated thread."""

    def warm_up(self) -> None: ...

    def run_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> BatchOutput: ...

    def encode(self, image: Any) -> str:
        """One image of a `BatchOutput` -> base64 PNG text."""
        ...


class DiffusersEngine:
    """A loaded `TextToImagePipeline` and optional `Gate`."""

    def __init__(self, pipeline: Any, gate: Any | None) -> None:
        self._pipeline = pipeline
        self._gate = gate

    @classmethod
    def load(cls, settings: WorkerSettings) -> DiffusersEngine:
        """Import torch, load pipeline and gate: seconds to minutes, so never on the event loop."""
        import torch

        from diffcascade_worker.models.pipeline import PipelineConfig, TextToImagePipeline

        started = time.perf_counter()
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        settings = resolve_settings(settings)
        assert settings.steps is not None and settings.guidance is not None
        assert settings.size is not None
        pipeline = TextToImagePipeline.load(
            PipelineConfig(
                model=settings.model,
                steps=settings.steps,
                guidance_scale=settings.guidance,
                size=settings.size,
                device=settings.device,
                dtype=settings.dtype,
                assembly=settings.assembly,
            )
        )
        logger.info("%s: %s", settings.model, pipeline.describe())
        gate = None
        if settings.gate is not None:
            from diffcascade_worker.gate.scorer import load_gate

            gate = load_gate(settings.gate)
        logger.info(
            "loaded %s (gate: %s) in %.1f s",
            settings.model,
            settings.gate or "none",
            time.perf_counter() - started,
        )
        return cls(pipeline, gate)

    def warm_up(self) -> None:
        self._pipeline.warm_up()
        if self._gate is not None:
            self._gate.score(self._pipeline.generate(["warm-up"], [0]), prompts=["warm-up"])

    def run_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> BatchOutput:
        import torch

        generated = self._pipeline.generate_batch(list(prompts), list(seeds))
        images = generated.images
        confidences = None
        if self._gate is not None:
            scores = self._gate.score(images, prompts=list(prompts))
            confidences = [float(c) for c in scores]
        # 8-bit pixels for the whole batch in one tensor op: per image, this conversion costs
        # more interpreter time than the PNG itself, and that time is taken from the pipeline.
        pixels = (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).contiguous().numpy()
        return BatchOutput(
            images=list(pixels),
            confidences=confidences,
            flagged=generated.nsfw_content_detected,
        )

    def encode(self, image: Any) -> str:
        """(H, W, 3) uint8 pixels -> base64 PNG (zlib level 1: lossless, several times faster)."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        return base64.b64encode(buffer.getvalue()).decode("ascii")


def resolve_settings(settings: WorkerSettings) -> WorkerSettings:
    """Fill run settings and assembly fields left unset from the model folder's record."""
    return settings.resolved(model_defaults(settings.model))


def model_defaults(model: str) -> dict[str, Any]:
    """Settings recorded in a local model folder's diffcascade.json, or {} (hub ids, folders
    without one). A record that breaks the rules is a ValueError naming the file: silently
    ignoring, say, its scheduler would serve other timesteps than the folder asks for."""
    from diffcascade_worker.models.assembly import read_model_defaults

    if not Path(model).expanduser().is_dir():
        return {}
    return read_model_defaults(Path(model).expanduser())
