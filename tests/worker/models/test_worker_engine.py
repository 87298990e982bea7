"""The diffusers-backed engine the batcher runs (real tiny pipeline)."""

from __future__ import annotations

from pathlib import Path

from diffcascade_worker.models.engine import DiffusersEngine, resolve_settings
from diffcascade_worker.models.pipeline import decode_png_b64, encode_png_b64
from diffcascade_worker.serving.settings import WorkerSettings


def test_served_png_has_exactly_the_pipelines_pixels(tiny_models: dict[str, Path]) -> None:
    """The engine's batch-level 8-bit conversion and PNG match the pipeline's own encoder."""
    settings = resolve_settings(WorkerSettings(model=str(tiny_models["light"]), variant="v"))
    engine = DiffusersEngine.load(settings)
    served = engine.run_batch(["a cat", "a dog"], [3, 4])
    reference = engine._pipeline.generate(["a cat", "a dog"], [3, 4])
    for pixels, image in zip(served.images, reference, strict=True):
        assert decode_png_b64(engine.encode(pixels)).equal(decode_png_b64(encode_png_b64(image)))
