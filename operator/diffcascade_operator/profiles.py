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

from diffcascade_operator.spec import (
    CascadeSpec,
    DeferCurveSpec,
    QualitySpec,
    QualityTableSpec,
    RouterSpec,
    VariantSpec,
)


@dataclass(frozen=True)
class QualityCurve:
    """FID of the cascade's output by the share of queries the light model serves."""

    light_shares: tuple[float, ...]
    fids: tuple[float, ...]


@dataclass(frozen=True)
class QualityRow:
    """One measured configuration of a hybrid cascade (HADIS's table row).

    `router_share` r: the top-r share of prompts by router score goes straight to `heavy`;
    `escalate_share` c: the lowest-c share of the light model's confidence distribution is
    escalated after the light stage; `heavy_share` h: the share the heavy stage serves as
    the table states it (r + c - rc in HADIS's tables); `fid` measured for that rule.
    """

    light: str
    heavy: str
    router_share: float
    escalate_share: float
    heavy_share: float
    fid: float

    @property
    def pair(self) -> tuple[str, str]:
        return (self.light, self.heavy)

    def matches(self, pair: tuple[str, str], router_share: float, escalate_share: float) -> bool:
        """The exact (pair, r, c) of this row (shares compared to 1e-9)."""
        return (
            self.pair == pair
            and abs(self.router_share - router_share) < 1e-9
            and abs(self.escalate_share - escalate_share) < 1e-9
        )


@dataclass(frozen=True)
class QualityTable:
    """Quality of every configuration a hybrid planner may choose, measured offline.

    `rows`: the (pair, r, c, h, FID) rows a planner picks from; `pair_curves`: FID of each
    pair by light share with the discriminator alone (r = 0), the 1-D curves baselines are
    scored with; `single`: FID of each variant serving alone.
    """

    name: str
    rows: tuple[QualityRow, ...]
    pair_curves: Mapping[tuple[str, str], QualityCurve]
    single: Mapping[str, float]

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The pairs the rows use, in first-seen order."""
        return tuple(dict.fromkeys(row.pair for row in self.rows))

    def row(self, pair: tuple[str, str], router_share: float, escalate_share: float) -> QualityRow:
        """The row with exactly this (pair, r, c); ProfileError when the table has none."""
        for row in self.rows:
            if row.matches(pair, router_share, escalate_share):
                return row
        raise ProfileError(
            f"quality table {self.name}: no row {pair} r={router_share:g} c={escalate_share:g}"
        )

    def worst(self) -> QualityRow:
        """The row with the highest FID (HADIS scores a shed plan as this row)."""
        return max(self.rows, key=lambda r: r.fid)

    def served_fid(
        self, pair: tuple[str, str] | None, router_share: float, escalate_share: float
    ) -> float:
        """FID of what a pair really served: the row at (r, c) rounded to the table's 0.1
        grid when one exists, else the pair's discriminator-only curve at the heavy share
        r + (1 - r) c (no credit for routing beyond the mixture it produces). A pair of one
        variant (`pair[0] == pair[1]`) is that variant alone."""
        if pair is None:
            return max(self.single.values())
        if pair[0] == pair[1]:
            return self.single[pair[0]]
        r, c = round(router_share, 1), round(escalate_share, 1)
        for row in self.rows:
            if row.matches(pair, r, c):
                return row.fid
        heavy = router_share + (1.0 - router_share) * escalate_share
        return self.curve_fid(pair, heavy)

    def curve_fid(self, pair: tuple[str, str], heavy_share: float) -> float:
        """The pair's 1-D curve at a heavy share (single FIDs at its ends when it has none)."""
        curve = self.pair_curves.get(pair)
        if curve is None:
            lo, hi = self.single[pair[0]], self.single[pair[1]]
            return lo + (hi - lo) * heavy_share
        return fid_at(curve, 1.0 - heavy_share)


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
    #: Measured hybrid configurations (spec.qualityTable); None for a 1-D curve only.
    table: QualityTable | None = None


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
#: HADIS's per-prompt gate confidences (mean P(real) of each variant's 4 images), by variant.
_HADIS_VARIANTS = ("sdxl-lightning", "sd35-large-turbo", "sd35-medium", "sd35-large")
_CONFIDENCE_FILES.update({f"hadis-{v}": f"confidence_hadis-{v}.txt" for v in _HADIS_VARIANTS})
#: Bundled quality tables (HADIS `hadis/src/tables/*.py`) and per-prompt router scores.
_TABLE_NAMES = ("hadis-hybrid", "hadis-fixed13", "hadis-disc-only", "hadis-router-only")
_ROUTER_FILES = {"hadis-rule": "router_hadis-rule.txt"}


# --- interpolation -----------------------------------------------------------------------------


def defer_fraction(curve: DeferCurve, t: float) -> float:
    """f(t) by the contract's one reading (`DeferCurve.at`: piecewise linear, 0 at t <= 0,
    1 at t >= 1)."""
    return curve.at(t)


def threshold_for_share(curve: DeferCurve, share: float) -> float:
    """The smallest threshold t with f(t) >= share: the gate threshold that escalates the
    lowest `share` of the confidence distribution (HADIS's escalation share c is such a
    percentile). Piecewise-linear inverse of f; 1.0 when f never reaches the share."""
    if share <= 0.0:
        return 0.0
    ts, fs = curve.thresholds, curve.fractions
    for k, f in enumerate(fs):
        if f >= share:
            if k == 0:
                return ts[0]
            lo_t, lo_f = ts[k - 1], fs[k - 1]
            if f <= lo_f:
                return ts[k]
            return lo_t + (ts[k] - lo_t) * (share - lo_f) / (f - lo_f)
    return 1.0


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


def _values(text: str) -> tuple[float, ...]:
    return tuple(float(line) for line in text.splitlines() if line and not line.startswith("#"))


@cache
def reference_confidences(name: str) -> tuple[float, ...]:
    """Per-prompt gate confidence of a light model on the 5,000 reference prompts (in order)."""
    try:
        filename = _CONFIDENCE_FILES[name]
    except KeyError:
        raise ProfileError(
            f"no reference deferral curve {name!r}; known: {', '.join(reference_defer_names())}"
        ) from None
    return _values(_reference_text(filename))


def reference_router_names() -> tuple[str, ...]:
    return tuple(sorted(_ROUTER_FILES))


@cache
def reference_router_scores(name: str) -> tuple[float, ...]:
    """Per-prompt router score on the reference prompts (higher: harder, routed first)."""
    try:
        filename = _ROUTER_FILES[name]
    except KeyError:
        raise ProfileError(
            f"no reference router {name!r}; known: {', '.join(reference_router_names())}"
        ) from None
    return _values(_reference_text(filename))


def reference_table_names() -> tuple[str, ...]:
    return _TABLE_NAMES


@cache
def reference_quality_table(name: str) -> QualityTable:
    """A bundled quality table with the pair curves and single FIDs measured beside it."""
    if name not in _TABLE_NAMES:
        raise ProfileError(f"no reference quality table {name!r}; known: {', '.join(_TABLE_NAMES)}")
    key = name.removeprefix("hadis-").replace("-", "_")
    rows = tuple(
        QualityRow(
            light=r["light"],
            heavy=r["heavy"],
            router_share=float(r["router_share"]),
            escalate_share=float(r["escalate_share"]),
            heavy_share=float(r["heavy_share"]),
            fid=float(r["fid"]),
        )
        for r in csv.DictReader(_reference_text("hadis_quality_tables.csv").splitlines())
        if r["table"] == key
    )
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in csv.DictReader(_reference_text("hadis_pair_curves.csv").splitlines()):
        share = 1.0 - float(r["heavy_share"])
        points.setdefault((r["light"], r["heavy"]), []).append((round(share, 9), float(r["fid"])))
    curves = {pair: _quality(sorted(pts), f"{pair}") for pair, pts in points.items()}
    single = {
        r["variant"]: float(r["fid"])
        for r in csv.DictReader(_reference_text("hadis_single_fid.csv").splitlines())
    }
    return QualityTable(name=name, rows=rows, pair_curves=curves, single=single)


@cache
def reference_defer_curve(name: str) -> DeferCurve:
    """f(t) of a bundled gate ("sd-turbo", "sdxs"; "sdxl-lightning" = the sdxs curve).

    Exact on the threshold grid and at every half-percent quantile of the confidences: a
    gate whose confidences crowd into a corner of [0, 1] (HADIS's discriminator: most below
    0.01) is then still inverted to within half a percent (`threshold_for_share`)."""
    return defer_curve_from_scores(
        reference_confidences(name), thresholds=quantile_grid(reference_confidences(name))
    )


def quantile_grid(confidences: Sequence[float], *, steps: int = 200) -> tuple[float, ...]:
    """`THRESHOLD_GRID` with the confidences' k/`steps` quantiles added (sorted, distinct)."""
    ordered = sorted(c for c in confidences if not math.isnan(c))
    if not ordered:
        return THRESHOLD_GRID
    extra = {ordered[min(len(ordered) - 1, (k * len(ordered)) // steps)] for k in range(1, steps)}
    return tuple(sorted(set(THRESHOLD_GRID) | {t for t in extra if 0.0 < t < 1.0}))


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


def quality_table_from_spec(table: QualityTableSpec, variants: Sequence[str]) -> QualityTable:
    """A bundled table or inline rows; every variant a row names must be in the cascade."""
    if table.reference is not None:
        loaded = reference_quality_table(table.reference)
    else:
        rows = tuple(
            QualityRow(
                light=r.light,
                heavy=r.heavy,
                router_share=r.router_share,
                escalate_share=r.escalate_share,
                heavy_share=r.router_share + (1.0 - r.router_share) * r.escalate_share,
                fid=r.fid,
            )
            for r in table.rows or []
        )
        loaded = QualityTable(name="inline", rows=rows, pair_curves={}, single={})
    unknown = sorted({n for row in loaded.rows for n in row.pair} - set(variants))
    if unknown:
        raise ProfileError(
            f"quality table {loaded.name} names variants not in the cascade: {', '.join(unknown)}"
        )
    order = {n: i for i, n in enumerate(variants)}
    backwards = [row.pair for row in loaded.rows if order[row.light] >= order[row.heavy]]
    if backwards:
        raise ProfileError(
            f"quality table {loaded.name}: a row's light variant must come before its heavy one "
            f"in spec.variants ({backwards[0]})"
        )
    return loaded


def router_scores_from_spec(router: RouterSpec) -> tuple[float, ...] | None:
    """Per-prompt router scores of the spec's router on the reference prompts (its bundled
    `reference`); None when it names none (a live scorer only, nothing to replay)."""
    if router.reference is None:
        return None
    return reference_router_scores(router.reference)


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
    table = None
    if spec.quality_table is not None:
        table = quality_table_from_spec(spec.quality_table, [v.name for v in spec.variants])
    return CascadeProfiles(variants=variants, quality=quality, table=table)
