"""Whether every cascade's control loop still steps: what the operator's liveness probe reports.

A loop makes progress when a control step completes, with a decision or with an error the
apiserver returned (the loop is alive and waits for the apiserver; restarting the operator would
not help it). A loop without progress for `stall_intervals` of its interval (and at least
`stall_min_s`) is stalled: a call that never returns, a timer that is gone, or a step failing on
the operator's own error every time. The probe then fails and names each stalled cascade, how
long it has been stalled and its last error, and the kubelet restarts the operator.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Key = tuple[str | None, str]  # (namespace, name)


@dataclass
class _Loop:
    first_seen: float
    progress_at: float | None = None
    step_started_at: float | None = None  # a step is running now
    last_error: str | None = None


class LoopHealth:
    """Progress of every cascade's loop in this process; shared by the timers and the probe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loops: dict[Key, _Loop] = {}
        self._lock = threading.Lock()

    def _loop(self, key: Key) -> _Loop:
        loop = self._loops.get(key)
        if loop is None:
            loop = self._loops[key] = _Loop(first_seen=self._clock())
        return loop

    def step_started(self, key: Key) -> None:
        with self._lock:
            self._loop(key).step_started_at = self._clock()

    def step_skipped(self, key: Key) -> None:
        """The timer ran, but the interval had not passed: no step."""
        with self._lock:
            self._loop(key).step_started_at = None

    def step_done(self, key: Key, *, error: str | None = None) -> None:
        """A step completed; `error`: what the apiserver answered when it did not take a write."""
        with self._lock:
            loop = self._loop(key)
            loop.progress_at, loop.step_started_at, loop.last_error = self._clock(), None, error

    def step_failed(self, key: Key, error: str) -> None:
        """A step raised an error of the operator's own: no progress."""
        with self._lock:
            loop = self._loop(key)
            loop.step_started_at, loop.last_error = None, error

    def stalled(
        self, intervals: Mapping[Key, float], *, stall_intervals: float, stall_min_s: float
    ) -> list[str]:
        """One line per stalled loop among the cascades that exist now (`intervals`: each
        one's control interval in seconds); loops of cascades gone are forgotten."""
        now = self._clock()
        lines = []
        with self._lock:
            for key in [k for k in self._loops if k not in intervals]:
                del self._loops[key]
            for key, interval in sorted(intervals.items(), key=lambda kv: str(kv[0])):
                loop = self._loop(key)
                since = loop.progress_at if loop.progress_at is not None else loop.first_seen
                limit = max(stall_intervals * interval, stall_min_s)
                if now - since <= limit:
                    continue
                what = "no control step completed" if loop.progress_at else "no control step yet"
                line = (
                    f"{key[0]}/{key[1]}: {what} for {now - since:.0f} s (limit {limit:.0f} s, "
                    f"interval {interval:g} s)"
                )
                if loop.step_started_at is not None:
                    line += f"; a step has been running for {now - loop.step_started_at:.0f} s"
                if loop.last_error:
                    line += f"; last error: {loop.last_error}"
                lines.append(line)
        return lines
