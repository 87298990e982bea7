"""Profiles the allocator plans with: batch latency, the gate's deferral curve, quality.

Data types only here; loaders from files and from a spec build them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DeferCurve:
    """f(t): fraction of queries deferred at threshold t, on an increasing threshold grid."""

    thresholds: tuple[float, ...]
    fractions: tuple[float, ...]


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
