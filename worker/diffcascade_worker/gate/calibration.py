"""Calibrating a gate: each prompt's confidence, and the deferral curve f(t).

f(t) is the share of prompts that `should_defer(confidence, t)` sends to the next stage, on
the threshold grid the allocator plans with (t = 0, 0.005, ..., 1.0). Because the same rule
runs in the worker, f is exactly the deferral rate a threshold produces on traffic like the
calibration prompts: f(0) = 0 and f(1) = 1 by construction.

File format (the keys match the spec's `deferCurve`, so `thresholds` and `deferFractions` can
be pasted into a DiffusionCascade, or the file referenced by `deferCurve.path`):
    {"variant": ..., "model": ..., "prompts": N, "thresholds": [201 values],
     "deferFractions": [201 values], "confidences": [N values]}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from diffcascade_worker.deferral import (
    THRESHOLD_GRID,
    DeferCurve,
    DeferCurveError,
    curve_from_confidences,
    validate_curve,
)

if TYPE_CHECKING:
    import torch


class CurveFormatError(ValueError):
    """A deferral-curve file is missing, not JSON, or breaks the format's rules."""


class _Generates(Protocol):
    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], *, size: int | None = None
    ) -> torch.Tensor: ...


class _Scores(Protocol):
    def score(self, images: torch.Tensor) -> list[float]: ...


def threshold_grid() -> list[float]:
    """The shared threshold grid (`deferral.THRESHOLD_GRID`) as a list."""
    return list(THRESHOLD_GRID)


@dataclass(frozen=True)
class Calibration:
    """A calibrated gate: the prompts' confidences, the curve they give, and where from.

    The curve is the shared `deferral.DeferCurve`, so the worker, the allocator and the
    simulator read f(t) the same way (piecewise linear, exact on the grid).
    """

    model: str
    curve: DeferCurve
    confidences: tuple[float, ...]
    prompts: int
    variant: str | None = None

    @property
    def thresholds(self) -> tuple[float, ...]:
        return self.curve.thresholds

    @property
    def defer_fractions(self) -> tuple[float, ...]:
        return self.curve.fractions

    def defer_fraction(self, threshold: float) -> float:
        return self.curve.at(threshold)

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "model": self.model,
            "prompts": self.prompts,
            "thresholds": list(self.curve.thresholds),
            "deferFractions": list(self.curve.fractions),
            "confidences": list(self.confidences),
        }


def calibration_from_confidences(
    confidences: Sequence[float], *, model: str, variant: str | None = None
) -> Calibration:
    """f(t) = share of confidences that `should_defer` at t, for each grid t."""
    if not confidences:
        raise ValueError("need at least one confidence to build a curve")
    values = tuple(float(c) for c in confidences)
    return Calibration(
        model=model,
        variant=variant,
        curve=curve_from_confidences(values),
        confidences=values,
        prompts=len(values),
    )


def calibrate(
    pipeline: _Generates,
    gate: _Scores,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] | int = 0,
    batch_size: int = 8,
    images_per_prompt: int = 1,
    size: int | None = None,
    model: str | None = None,
    variant: str | None = None,
) -> Calibration:
    """Generate each prompt's image(s), score them and build f(t).

    `seeds` is one seed per prompt, or a base seed (prompt i uses base + i). With several images
    per prompt the prompt's confidence is their mean, as DiffServe averages 4 images per prompt.
    """
    if not prompts:
        raise ValueError("need at least one calibration prompt")
    if batch_size < 1 or images_per_prompt < 1:
        raise ValueError("batch_size and images_per_prompt must be >= 1")
    if isinstance(seeds, int):
        seed_list = [seeds + i for i in range(len(prompts))]
    else:
        seed_list = [int(s) for s in seeds]
        if len(seed_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seed_list)} seeds")
    jobs = [
        (index, prompt, seed + k * 1_000_003)
        for k in range(images_per_prompt)
        for index, (prompt, seed) in enumerate(zip(prompts, seed_list, strict=True))
    ]
    sums = [0.0] * len(prompts)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = pipeline.generate([p for _, p, _ in chunk], [s for _, _, s in chunk], size=size)
        for (index, _, _), score in zip(chunk, gate.score(images), strict=True):
            sums[index] += score
    confidences = [total / images_per_prompt for total in sums]
    name = (
        model if model is not None else str(getattr(getattr(pipeline, "config", None), "model", ""))
    )
    return calibration_from_confidences(confidences, model=name, variant=variant)


def write_curve(path: Path, curve: Calibration) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(curve.to_json(), indent=1) + "\n")
    return path


def read_curve(path: Path) -> Calibration:
    """Read and check a curve file; raises CurveFormatError with the reason."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CurveFormatError(f"defer curve {path} does not exist") from None
    except (OSError, ValueError) as error:
        raise CurveFormatError(f"defer curve {path} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise CurveFormatError(f"defer curve {path} must hold a JSON object")
    try:
        curve = validate_curve(
            data.get("thresholds", ()), data.get("deferFractions", ()), where=f"defer curve {path}"
        )
        confidences = tuple(float(v) for v in data.get("confidences") or ())
    except (DeferCurveError, TypeError, ValueError) as error:
        raise CurveFormatError(str(error)) from error
    variant = data.get("variant")
    prompts = data.get("prompts", len(confidences))
    if not isinstance(prompts, int) or prompts < 0:
        raise CurveFormatError(f"defer curve {path}: 'prompts' must be a count")
    return Calibration(
        prompts=prompts,
        model=str(data.get("model") or ""),
        variant=None if variant is None else str(variant),
        curve=curve,
        confidences=confidences,
    )
