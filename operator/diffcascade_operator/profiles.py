"""Profiles the allocator plans with: batch latency, the gate's deferral curve, quality.

The dataclasses are the contract; the loaders build them from the bundled reference data
(the DiffServe artifact, see `reference/ATTRIBUTION.md`), from the worker's calibration file
and from a cascade spec. Interpolation is piecewise linear everywhere (no curve fitting), so
a profiled point is always reproduced exactly.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from diffcascade_worker.deferral import (
    THRESHOLD_GRID as THRESHOLD_GRID,  # re-exported: the contract, for planning code
)
from diffcascade_worker.deferral import (
    DeferCurve as DeferCurve,
)
from diffcascade_worker.deferral import (
    DeferCurveError,
    curve_from_confidences,
    curve_from_document,
    interpolate,
    validate_curve,
)

from diffcascade_operator.spec import CascadeSpec, DeferCurveSpec, QualitySpec, VariantSpec


@dataclass(frozen=True)
class QualityCurve:
    """FID of the cascade's output by the share of queries the light model serves."""

    light_shares: tuple[float, ...]
    fids: tuple[float, ...]


@dataclass(frozen=True)
class VariantProfile:
    name: str
    batch_latency_ms: Mapping[int, float]  # batch size -> mean latency of one batch
    defer_curve: DeferCurve | None  # None on the last stage
    gpus_per_replica: int = 1
    startup_seconds: float = 0.0


@dataclass(frozen=True)
class CascadeProfiles:
    variants: tuple[VariantProfile, ...]  # ordered light -> heavy
    quality: QualityCurve | None


class ProfileError(ValueError):
    """A profile that cannot be loaded or used; the message says which and why."""


_REFERENCE_PACKAGE = "diffcascade_operator.reference"

#: Reference gate curves by light model. The artifact's sdxl-lightning cascade reuses the sdxs
#: discriminator outputs verbatim (its `dist_sdxlltn.txt` is byte-identical to `dist_sdxs.txt`),
#: so "sdxl-lightning" is an alias of "sdxs", not an SDXL-specific curve.
_CONFIDENCE_FILES = {
    "sd-turbo": "confidence_sd-turbo.txt",
    "sdxs": "confidence_sdxs.txt",
    "sdxl-lightning": "confidence_sdxs.txt",
}
_QUALITY_NAMES = ("c1", "c2", "c3")  # sd-turbo->sd-v1.5, sdxs->sd-v1.5, sdxl-lightning->sdxl


# --- interpolation -----------------------------------------------------------------------------


def defer_fraction(curve: DeferCurve, t: float) -> float:
    """f(t) by the contract's one reading (`DeferCurve.at`: piecewise linear, 0 at t <= 0,
    1 at t >= 1)."""
    return curve.at(t)


def fid_at(quality: QualityCurve, light_share: float) -> float:
    """FID at a light share, piecewise linear between profiled points (not the quadratic fit)."""
    return interpolate(quality.light_shares, quality.fids, light_share)


def batch_latency_ms(table: Mapping[int, float], batch_size: int) -> float:
    """Latency of a batch size, profiled or not.

    Between profiled sizes: linear. Below the smallest: the smallest's latency (a smaller batch
    is not slower). Above the largest: the largest's per-image cost times the size.
    """
    if not table:
        raise ProfileError("empty batch latency table")
    if batch_size in table:
        return float(table[batch_size])
    sizes = sorted(table)
    if batch_size < sizes[0]:
        return float(table[sizes[0]])
    if batch_size > sizes[-1]:
        return float(table[sizes[-1]]) * batch_size / sizes[-1]
    return interpolate([float(s) for s in sizes], [table[s] for s in sizes], float(batch_size))


def candidate_batches(table: Mapping[int, float], max_batch_size: int) -> dict[int, float]:
    """The profiled sizes the allocator may choose, capped at `max_batch_size`.

    When nothing profiled fits under the cap, the cap itself is the one candidate, with the
    latency `batch_latency_ms` estimates for it.
    """
    kept = {b: float(ms) for b, ms in sorted(table.items()) if b <= max_batch_size}
    if not kept:
        kept = {max_batch_size: batch_latency_ms(table, max_batch_size)}
    return kept


# --- builders ----------------------------------------------------------------------------------


def defer_curve_from_scores(
    confidences: Iterable[float], *, thresholds: Sequence[float] = THRESHOLD_GRID
) -> DeferCurve:
    """f(t) = share of prompts the worker's rule defers at t (`deferral.curve_from_confidences`)."""
    values = [float(c) for c in confidences]
    if any(math.isnan(c) for c in values):
        raise ProfileError("confidences contain NaN")
    try:
        return curve_from_confidences(values, thresholds=thresholds)
    except DeferCurveError as exc:
        raise ProfileError(str(exc)) from None


def confidences_from_disc_scores(
    values: Sequence[float], *, images_per_prompt: int = 4
) -> tuple[float, ...]:
    """Per-prompt confidence from a discriminator's P(fake) values: 1 - mean over its images."""
    if images_per_prompt < 1 or len(values) % images_per_prompt:
        raise ProfileError(
            f"{len(values)} scores do not split into groups of {images_per_prompt} per prompt"
        )
    return tuple(
        1.0 - sum(values[i : i + images_per_prompt]) / images_per_prompt
        for i in range(0, len(values), images_per_prompt)
    )


def _checked_curve(thresholds: Sequence[Any], fractions: Sequence[Any], where: str) -> DeferCurve:
    try:
        return validate_curve(thresholds, fractions, where=where)
    except DeferCurveError as exc:
        raise ProfileError(str(exc)) from None


def load_defer_curve_file(path: Path) -> DeferCurve:
    """The worker's calibration JSON: {"thresholds": [...], "deferFractions": [...]}.

    An optional "confidences" list (per calibration prompt) takes precedence: the curve is then
    rebuilt on the allocator's grid, which is exact rather than interpolated.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"cannot read deferral curve {path}: {exc}") from exc
    try:
        return curve_from_document(doc, where=str(path))
    except DeferCurveError as exc:
        raise ProfileError(str(exc)) from None


def load_latency_csv(path: Path | None = None) -> dict[str, dict[int, float]]:
    """`model,batch_size,latency_ms` rows -> {model: {batch: ms}}; the bundled table if no path."""
    text = (
        _reference_text("latency_a100_ms.csv")
        if path is None
        else _read(Path(path), "latency profile")
    )
    table: dict[str, dict[int, float]] = {}
    try:
        for row in csv.DictReader(text.splitlines()):
            table.setdefault(row["model"], {})[int(row["batch_size"])] = float(row["latency_ms"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ProfileError(f"latency profile {path}: bad row ({exc})") from exc
    return {model: dict(sorted(rows.items())) for model, rows in table.items()}


def load_quality_csv(path: Path | None = None) -> dict[str, QualityCurve]:
    """`cascade,...,light_share,fid` rows -> {cascade: curve}; the bundled table if no path."""
    text = (
        _reference_text("fid_vs_light_share.csv")
        if path is None
        else _read(Path(path), "quality curve")
    )
    points: dict[str, list[tuple[float, float]]] = {}
    try:
        for row in csv.DictReader(text.splitlines()):
            points.setdefault(row["cascade"], []).append(
                (float(row["light_share"]), float(row["fid"]))
            )
    except (KeyError, ValueError, TypeError) as exc:
        raise ProfileError(f"quality curve {path}: bad row ({exc})") from exc
    return {name: _quality(sorted(pts), name) for name, pts in points.items()}


def _quality(points: Sequence[tuple[float, float]], where: str) -> QualityCurve:
    shares = tuple(p[0] for p in points)
    if len(shares) < 2 or any(b <= a for a, b in itertools.pairwise(shares)):
        raise ProfileError(f"quality {where}: needs >= 2 points with distinct light shares")
    return QualityCurve(light_shares=shares, fids=tuple(p[1] for p in points))


# --- bundled reference data --------------------------------------------------------------------


def _reference_text(name: str) -> str:
    return resources.files(_REFERENCE_PACKAGE).joinpath(name).read_text()


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ProfileError(f"cannot read {what} {path}: {exc}") from exc


def reference_defer_names() -> tuple[str, ...]:
    return tuple(sorted(_CONFIDENCE_FILES))


def reference_quality_names() -> tuple[str, ...]:
    return _QUALITY_NAMES


@cache
def reference_confidences(name: str) -> tuple[float, ...]:
    """Per-prompt gate confidence of a light model on the 5,000 reference prompts (in order)."""
    try:
        filename = _CONFIDENCE_FILES[name]
    except KeyError:
        raise ProfileError(
            f"no reference deferral curve {name!r}; known: {', '.join(reference_defer_names())}"
        ) from None
    return tuple(float(line) for line in _reference_text(filename).split())


@cache
def reference_defer_curve(name: str) -> DeferCurve:
    """f(t) of a bundled gate ("sd-turbo", "sdxs"; "sdxl-lightning" = the sdxs curve)."""
    return defer_curve_from_scores(reference_confidences(name))


@cache
def reference_quality(name: str) -> QualityCurve:
    """FID by light share: "c1" sd-turbo->sd-v1.5, "c2" sdxs->sd-v1.5, "c3" lightning->sdxl."""
    curves = load_quality_csv()
    if name not in curves:
        raise ProfileError(f"no reference quality curve {name!r}; known: {', '.join(curves)}")
    return curves[name]


def reference_latency(model: str) -> dict[int, float]:
    """Batch latency (ms, one A100): sd-turbo, sdxs, sd-v1.5, sdxl-lightning or sdxl."""
    table = _reference_latency()
    if model not in table:
        raise ProfileError(f"no reference latency profile {model!r}; known: {', '.join(table)}")
    return dict(table[model])


@cache
def _reference_latency() -> dict[str, dict[int, float]]:
    return load_latency_csv()


# --- from a spec -------------------------------------------------------------------------------


def defer_curve_from_spec(curve: DeferCurveSpec, *, base_dir: Path | None = None) -> DeferCurve:
    """Inline points, a bundled reference, or a calibration file (relative to `base_dir`)."""
    if curve.reference is not None:
        return reference_defer_curve(curve.reference)
    if curve.path is not None:
        path = Path(curve.path)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return load_defer_curve_file(path)
    return _checked_curve(curve.thresholds or [], curve.defer_fractions or [], "deferCurve")


def quality_from_spec(quality: QualitySpec) -> QualityCurve:
    if quality.reference is not None:
        return reference_quality(quality.reference)
    points = sorted((p.light_share, p.fid) for p in quality.fid_by_light_share or [])
    return _quality(points, "fidByLightShare")


def variant_profile(variant: VariantSpec, *, base_dir: Path | None = None) -> VariantProfile:
    gate = variant.gate
    curve = None
    if gate is not None and gate.defer_curve is not None:
        curve = defer_curve_from_spec(gate.defer_curve, base_dir=base_dir)
    table = variant.profile.batch_latency_ms
    if table is None:  # profile.auto: the operator fills the measured table in first
        raise ProfileError(
            f"variant {variant.name}: profile.auto is measured by the operator's profiling Job; "
            "here, run `diffcascade-worker profile` and set profile.batchLatencyMs"
        )
    return VariantProfile(
        name=variant.name,
        batch_latency_ms=candidate_batches(table, variant.max_batch_size),
        defer_curve=curve,
        gpus_per_replica=variant.gpus_per_replica,
        startup_seconds=variant.profile.startup_seconds,
    )


def profiles_from_spec(spec: CascadeSpec, *, base_dir: Path | None = None) -> CascadeProfiles:
    """Everything the allocator needs from a spec; ProfileError names what cannot be loaded.

    Batch sizes above a variant's `maxBatchSize` are dropped here, so the allocator only ever
    chooses among profiled sizes the worker accepts.
    """
    variants = tuple(variant_profile(v, base_dir=base_dir) for v in spec.variants)
    quality = quality_from_spec(spec.quality) if spec.quality is not None else None
    return CascadeProfiles(variants=variants, quality=quality)
