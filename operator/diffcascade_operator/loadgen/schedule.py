"""When each request is sent: a replayed trace or Poisson arrivals at a fixed rate."""

from __future__ import annotations

import random
from dataclasses import dataclass

from diffcascade_operator.sim.traces import TraceError, load_trace

__all__ = ["Arrival", "Schedule", "TraceError", "poisson_schedule", "trace_schedule"]


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the start of the replay
    prompt_index: int  # index into the prompt list (wraps around)


@dataclass(frozen=True)
class Schedule:
    name: str
    arrivals: tuple[Arrival, ...]

    @property
    def duration_s(self) -> float:
        return self.arrivals[-1].at_s if self.arrivals else 0.0


def trace_schedule(
    name_or_path: str, *, duration_s: float | None = None, speed: float = 1.0
) -> Schedule:
    """A DiffServe trace (`<arrival_ms>,<prompt_idx>` lines; file or bundled name).

    `duration_s` cuts the trace after that many seconds of replay; `speed` > 1 compresses time.
    Raises TraceError for a missing or malformed trace.
    """
    trace = load_trace(name_or_path)
    arrivals = []
    for at, prompt in zip(trace.arrivals_s, trace.prompts, strict=True):
        scaled = at / speed
        if duration_s is not None and scaled > duration_s:
            break
        arrivals.append(Arrival(at_s=scaled, prompt_index=prompt))
    if not arrivals:
        raise TraceError(f"trace {trace.name}: no request within the first {duration_s} s")
    return Schedule(name=trace.name, arrivals=tuple(arrivals))


def poisson_schedule(*, qps: float, duration_s: float, seed: int = 0) -> Schedule:
    """Poisson arrivals at `qps` for `duration_s` seconds; prompts drawn uniformly."""
    if qps <= 0 or duration_s <= 0:
        raise ValueError("qps and duration must be positive")
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    at = rng.expovariate(qps)
    while at < duration_s:
        arrivals.append(Arrival(at_s=at, prompt_index=rng.randrange(1_000_000)))
        at += rng.expovariate(qps)
    return Schedule(name=f"poisson-{qps:g}qps-{duration_s:g}s", arrivals=tuple(arrivals))
