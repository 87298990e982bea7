"""Measuring a variant on the machine it runs on: the batch latency table and f(t).

A batch's latency is what the worker's engine spends on it: generate the batch, then (on a
gated variant) score it with the gate, each timed from call to CPU tensor. Every batch size is
warmed up, then timed `repeats` times; the table keeps the mean, made non-decreasing in the
batch size (a bigger batch never finishes sooner: it could be padded), and the raw means are
kept beside it. The deferral curve comes from the gate's confidence on every prompt, through
the same rule the worker serves with (`deferral.curve_from_confidences`).

The result is one JSON document (`ProfileResult.to_json`), keyed like the spec's `profile` and
`gate.deferCurve`, so it can be pasted into a DiffusionCascade; `compact_json` is the same
under 4 KiB, for a Kubernetes termination message (how a profiling Job hands it back).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from diffcascade_worker.deferral import curve_from_confidences

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
COMPACT_CURVE_STEP = 0.02  # thresholds 0, 0.02, ..., 1 in the termination message
TERMINATION_MESSAGE_LIMIT = 4096


class _Generates(Protocol):
    def generate(
        self, prompts: Sequence[str], seeds: Sequence[int], *, size: int | None = None
    ) -> torch.Tensor: ...


class _Scores(Protocol):
    def score(
        self, images: torch.Tensor, *, prompts: Sequence[str] | None = None
    ) -> list[float]: ...


@dataclass(frozen=True)
class ProfileResult:
    model: str
    steps: int
    guidance_scale: float
    size: int
    device: str
    batch_latency_ms: dict[int, float]
    raw_batch_latency_ms: dict[int, float]
    repeats: int
    prompts: int
    seconds: float
    variant: str | None = None
    key: str | None = None
    accelerator: str = ""
    thresholds: tuple[float, ...] | None = None
    defer_fractions: tuple[float, ...] | None = None
    confidences: tuple[float, ...] = field(default=())
    measured_at: str = ""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "variant": self.variant,
            "key": self.key,
            "model": self.model,
            "steps": self.steps,
            "guidanceScale": self.guidance_scale,
            "size": self.size,
            "device": self.device,
            "accelerator": self.accelerator,
            "repeats": self.repeats,
            "prompts": self.prompts,
            "seconds": round(self.seconds, 3),
            "measuredAt": self.measured_at,
            "batchLatencyMs": {str(b): round(ms, 3) for b, ms in self.batch_latency_ms.items()},
            "rawBatchLatencyMs": {
                str(b): round(ms, 3) for b, ms in self.raw_batch_latency_ms.items()
            },
        }
        if self.thresholds is not None and self.defer_fractions is not None:
            doc["deferCurve"] = {
                "thresholds": list(self.thresholds),
                "deferFractions": list(self.defer_fractions),
            }
            doc["confidences"] = [round(c, 6) for c in self.confidences]
        return doc

    def compact_json(self) -> str:
        """The result without raw confidences, the curve on a 0.02 grid: under 4 KiB."""
        doc = self.to_json()
        doc.pop("confidences", None)
        doc.pop("rawBatchLatencyMs", None)
        if self.thresholds is not None and self.defer_fractions is not None:
            steps = round(1 / COMPACT_CURVE_STEP)
            grid = [round(i * COMPACT_CURVE_STEP, 4) for i in range(steps + 1)]
            curve = curve_from_confidences(self.confidences, thresholds=grid)
            doc["deferCurve"] = {
                "thresholds": grid,
                "deferFractions": [round(f, 4) for f in curve.fractions],
            }
        text = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:
            raise ValueError(f"compact profile is {len(text)} bytes, over 4 KiB")
        return text


def monotone(table: dict[int, float]) -> dict[int, float]:
    """Running maximum over increasing batch sizes."""
    out: dict[int, float] = {}
    best = 0.0
    for size in sorted(table):
        best = max(best, table[size])
        out[size] = best
    return out


def profile_variant(
    pipeline: _Generates,
    gate: _Scores | None,
    prompts: Sequence[str],
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    model: str,
    steps: int,
    guidance_scale: float,
    size: int,
    device: str,
    variant: str | None = None,
    key: str | None = None,
) -> ProfileResult:
    """Time each batch size (generate + gate) and, with a gate, build f(t) over `prompts`."""
    if not prompts:
        raise ValueError("need at least one prompt")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    started = time.perf_counter()
    confidences: dict[int, float] = {}
    cursor = 0

    def run(batch: int, *, record: bool) -> float:
        nonlocal cursor
        index = [(cursor + i) % len(prompts) for i in range(batch)]
        cursor = (cursor + batch) % len(prompts)
        texts = [prompts[i] for i in index]
        t0 = time.perf_counter()
        images = pipeline.generate(texts, [seed + i for i in index])
        scores = gate.score(images, prompts=texts) if gate is not None else None
        elapsed = (time.perf_counter() - t0) * 1000.0
        if record and scores is not None:
            for i, score in zip(index, scores, strict=True):
                confidences.setdefault(i, float(score))
        return elapsed

    raw: dict[int, float] = {}
    for batch in sizes:
        for _ in range(warmup):
            run(batch, record=True)
        raw[batch] = sum(run(batch, record=True) for _ in range(repeats)) / repeats
    thresholds = fractions = None
    scored: tuple[float, ...] = ()
    if gate is not None:
        chunk = sizes[-1]
        missing = [i for i in range(len(prompts)) if i not in confidences]
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            texts = [prompts[i] for i in part]
            images = pipeline.generate(texts, [seed + i for i in part])
            for i, score in zip(part, gate.score(images, prompts=texts), strict=True):
                confidences[i] = float(score)
        scored = tuple(confidences[i] for i in range(len(prompts)))
        curve = curve_from_confidences(scored)
        thresholds, fractions = tuple(curve.thresholds), tuple(curve.fractions)
    accelerator = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        accelerator = torch.cuda.get_device_name(torch.device(device))
    return ProfileResult(
        model=model,
        steps=steps,
        guidance_scale=guidance_scale,
        size=size,
        device=device,
        batch_latency_ms=monotone(raw),
        raw_batch_latency_ms=raw,
        repeats=repeats,
        prompts=len(prompts),
        seconds=time.perf_counter() - started,
        variant=variant,
        key=key,
        accelerator=accelerator,
        thresholds=thresholds,
        defer_fractions=fractions,
        confidences=scored,
        measured_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
