"""A simulated Prometheus: scrapes the simulated workers and answers as `PrometheusSource` does.

The operator reads the cascade through two instant queries: the `irate` of the arrival
counters (the rate between the last two scrapes) and the summed queue-depth gauges. This
class keeps the same scrapes in virtual time and answers with the same numbers, so the
simulator's controller sees what the operator would see, scrape cadence included. It also
keeps the in-flight gauge, which the DiffServe artifact's estimator reads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from diffcascade_operator.metrics_source import MetricsReading
from diffcascade_operator.snapshot import StageSample


@dataclass(frozen=True)
class Scrape:
    at: float
    arrivals: tuple[int, ...]  # counter values per stage (summed over its workers)
    queue_depth: tuple[int, ...]  # gauges per stage
    inflight: tuple[int, ...]
    entered: int = 0  # the cascade's entry counter (the demand, whatever the entry stage)


class SimulatedPrometheus:
    def __init__(self, *, stages: Sequence[str], retention: int = 8) -> None:
        self.stages = tuple(stages)
        self._arrivals = [0] * len(self.stages)
        self._entered = 0  # queries that entered the cascade, whatever their entry stage
        self._scrapes: deque[Scrape] = deque(maxlen=max(2, retention))

    def arrived(self, stage: int) -> None:
        """A worker of `stage` counted one more arrival (its counter only ever grows)."""
        self._arrivals[stage] += 1

    def entered(self) -> None:
        """One more query reached the cascade: its router counts every arrival, whatever stage
        the plan in force enters at."""
        self._entered += 1

    def scrape(self, now: float, *, queue_depth: Sequence[int], inflight: Sequence[int]) -> None:
        self._scrapes.append(
            Scrape(now, tuple(self._arrivals), tuple(queue_depth), tuple(inflight), self._entered)
        )

    def read(self, now: float, *, window_s: float | None = None) -> MetricsReading | None:
        """The reading `PrometheusSource.read` would return at `now`; None while no rate
        exists yet (it raises MetricsUnavailable then, and the operator holds).

        Like the operator's source: `irate` per stage (the last two scrapes), the cascade's
        arrivals as its router counts them (`entered`), and with `window_s` (the control
        interval) the rates over that window, from the first scrape in it to the last."""
        done = [s for s in self._scrapes if s.at <= now]
        if len(done) < 2:
            return None
        before, last = done[-2], done[-1]
        span = last.at - before.at
        rates = [(b - a) / span for a, b in zip(before.arrivals, last.arrivals, strict=True)]
        stages = {
            name: StageSample(
                queue_depth=float(last.queue_depth[i]),
                arrival_qps=rates[i],
                inflight=float(last.inflight[i]),
            )
            for i, name in enumerate(self.stages)
        }
        window: dict[str, float] | None = None
        cascade_window: float | None = None
        width = 0.0
        if window_s is not None:
            inside = [s for s in done if s.at >= now - window_s - 1e-9]
            first = inside[0]
            width = last.at - first.at
            if width > 0:
                window = {
                    name: (last.arrivals[i] - first.arrivals[i]) / width
                    for i, name in enumerate(self.stages)
                }
                cascade_window = (last.entered - first.entered) / width
        return MetricsReading(
            demand_qps=rates[0],
            stages=stages,
            source="Prometheus",
            at=last.at,
            window_qps=window,
            cascade_qps=(last.entered - before.entered) / span,
            cascade_window_qps=cascade_window,
            window_s=width,
        )
