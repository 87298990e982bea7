"""Request traces: one `<arrival_ms>,<prompt_idx>` line per request (the DiffServe format).

The DiffServe traces draw Poisson arrivals per second and are not strictly ordered, so a
parsed trace is sorted by arrival time (stable, so equal times keep the file's order). Long idle
stretches are replayed shortened (`compress_idle`), so a simulation's cost follows its requests,
not the span of the trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from diffcascade_operator.sim.locate import bundled_dir


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True)
class Trace:
    name: str
    arrivals_s: tuple[float, ...]  # sorted, seconds from the trace start
    prompts: tuple[int, ...]  # prompt index of each request, same order
    idle_skipped_s: float = 0.0  # idle time `compress_idle` took out (0: replayed as written)

    def __len__(self) -> int:
        return len(self.arrivals_s)

    @property
    def duration_s(self) -> float:
        return self.arrivals_s[-1] if self.arrivals_s else 0.0


def parse_trace(text: str, *, name: str = "trace") -> Trace:
    """Parse trace text; blank lines and `#` comments are skipped."""
    rows: list[tuple[float, int]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(",")
        if len(parts) != 2:
            raise TraceError(
                f"{name} line {lineno}: expected '<arrival_ms>,<prompt_idx>', got {line!r}"
            )
        try:
            arrival_ms, prompt_value = float(parts[0]), float(parts[1])
        except ValueError:
            raise TraceError(
                f"{name} line {lineno}: arrival_ms and prompt_idx must be numbers, got {line!r}"
            ) from None
        if not math.isfinite(arrival_ms) or arrival_ms < 0:
            raise TraceError(f"{name} line {lineno}: arrival_ms must be >= 0, got {parts[0]!r}")
        if not math.isfinite(prompt_value) or prompt_value < 0:
            raise TraceError(
                f"{name} line {lineno}: prompt_idx must be a whole number >= 0, got {parts[1]!r}"
            )
        prompt = int(prompt_value)
        rows.append((arrival_ms / 1000.0, prompt))
    if not rows:
        raise TraceError(f"{name}: no requests in the trace")
    rows.sort(key=lambda row: row[0])
    return Trace(
        name=name,
        arrivals_s=tuple(r[0] for r in rows),
        prompts=tuple(r[1] for r in rows),
    )


def compress_idle(trace: Trace, *, horizon_s: float) -> Trace:
    """The trace with every stretch without arrivals longer than `horizon_s` (the first one,
    from 0, included) shortened to `horizon_s`; `idle_skipped_s` says how much was taken out.

    A caller picks a horizon after which the simulated cascade is idle and its control loop
    stationary (`sim.run.idle_horizon_s`): the rest of such a stretch changes no request's
    outcome, and replaying it would only cost a tick per interval and a row per second."""
    if not horizon_s > 0:
        raise ValueError(f"horizon_s must be > 0, got {horizon_s}")
    arrivals: list[float] = []
    skipped, previous_in, previous_out = 0.0, 0.0, 0.0
    for at in trace.arrivals_s:
        gap = at - previous_in
        if gap > horizon_s:
            skipped += gap - horizon_s
            gap = horizon_s
        previous_in, previous_out = at, previous_out + gap
        arrivals.append(previous_out)
    if skipped == 0.0:
        return trace
    return Trace(
        name=trace.name,
        arrivals_s=tuple(arrivals),
        prompts=trace.prompts,
        idle_skipped_s=trace.idle_skipped_s + skipped,
    )


def bundled_traces() -> list[str]:
    """Names of the traces shipped in bench/traces (without `.txt`)."""
    folder = bundled_dir("traces")
    return sorted(p.stem for p in folder.glob("*.txt")) if folder else []


def resolve_trace_path(name_or_path: str) -> Path:
    """A file path as given, or a bundled trace name such as `maf_1to8qps`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    folder = bundled_dir("traces")
    if folder is not None:
        for candidate in (folder / name_or_path, folder / f"{name_or_path}.txt"):
            if candidate.is_file():
                return candidate
    known = ", ".join(bundled_traces()) or "none found"
    raise TraceError(f"trace {name_or_path!r} is neither a file nor a bundled trace ({known})")


def load_trace(name_or_path: str) -> Trace:
    path = resolve_trace_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"cannot read trace {path}: {exc}") from None
    return parse_trace(text, name=path.stem if path.suffix == ".txt" else path.name)
