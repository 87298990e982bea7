"""Operator chaos harness: the unmodified Kopf operator against kmock with apiserver faults,
and a real Prometheus scraping an exporter that can turn poisonous.

`Exporter` serves what workers export (the protocol's metric names and labels) for several
cascades at once, and answers like a broken one on demand: an arrival counter growing at 1e25 a
second, a NaN queue gauge, batch histograms that count batches but add no time. `OperatorRun`
runs `kopf run` on the handlers module (with Kopf's liveness endpoint) and keeps its log.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from diffcascade_worker.protocol import (
    ARRIVALS,
    BATCH_SECONDS,
    LABEL_BATCH_SIZE,
    LABEL_CASCADE,
    LABEL_VARIANT,
    QUEUE_DEPTH,
)
from kopf._core.intents.registries import SmartOperatorRegistry
from kopf.testing import KopfRunner
from kube_env import HANDLERS, Cluster, environment, free_port

VARIANTS = ("light", "heavy")


@dataclass
class _Series:
    mode: str = "sane"  # sane | huge | nan | zero_latency
    qps: float = 1.0
    arrivals: float = 0.0
    batches: float = 0.0
    batch_seconds: float = 0.0
    at: float = field(default_factory=time.monotonic)


class Exporter:
    """/metrics of a cascade's workers, per cascade name, advanced at every scrape."""

    def __init__(self) -> None:
        self.port = free_port()
        self._series: dict[str, _Series] = {}
        self._lock = threading.Lock()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, cascade: str, *, mode: str | None = None, qps: float | None = None) -> None:
        with self._lock:
            series = self._series.setdefault(cascade, _Series())
            if series.mode == "huge" and mode not in (None, "huge"):
                series.arrivals = 0.0  # a restarted worker: 1e26 + n would never change again
            series.mode = mode or series.mode
            series.qps = series.qps if qps is None else qps

    def render(self) -> str:
        lines = [
            f"# TYPE {ARRIVALS.exposed} counter",
            f"# TYPE {QUEUE_DEPTH.exposed} gauge",
            f"# TYPE {BATCH_SECONDS.name} histogram",
        ]
        now = time.monotonic()
        with self._lock:
            for cascade, s in sorted(self._series.items()):
                dt, s.at = now - s.at, now
                s.arrivals += (1e25 if s.mode == "huge" else s.qps) * dt
                s.batches += s.qps * dt
                if s.mode != "zero_latency":
                    s.batch_seconds += s.qps * dt * 0.4
                for variant in VARIANTS:
                    labels = f'{LABEL_CASCADE}="{cascade}",{LABEL_VARIANT}="{variant}"'
                    share = 1.0 if variant == "light" else 0.3
                    depth = "NaN" if s.mode == "nan" else "0"
                    lines.append(f"{ARRIVALS.exposed}{{{labels}}} {s.arrivals * share!r}")
                    lines.append(f"{QUEUE_DEPTH.exposed}{{{labels}}} {depth}")
                    sized = f'{labels},{LABEL_BATCH_SIZE}="1"'
                    lines.append(
                        f'{BATCH_SECONDS.name}_bucket{{{sized},le="+Inf"}} {s.batches * share!r}'
                    )
                    lines.append(f"{BATCH_SECONDS.name}_count{{{sized}}} {s.batches * share!r}")
                    lines.append(f"{BATCH_SECONDS.name}_sum{{{sized}}} {s.batch_seconds * share!r}")
        return "\n".join(lines) + "\n"

    def __enter__(self) -> Exporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class OperatorRun:
    """`kopf run --standalone --all-namespaces` on the handlers, with a liveness endpoint."""

    def __init__(self, env: dict[str, str], *, log_dir: Path, name: str) -> None:
        self.env, self.log_dir, self.name = env, log_dir, name
        self.liveness_port = free_port()
        self.output = ""

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.liveness_port}/healthz"

    def __enter__(self) -> OperatorRun:
        self._env = environment(self.env)
        self._env.__enter__()
        self.runner = KopfRunner(
            [
                "run",
                "--standalone",
                "--all-namespaces",
                f"--liveness={self.liveness_url}",
                str(HANDLERS),
            ],
            timeout=90,
            registry=SmartOperatorRegistry(),
        )
        self.runner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.runner.__exit__(*exc)
        finally:
            self._env.__exit__(None, None, None)
            # Kopf swaps stdout while it runs: its log is only readable now.
            self.output = self.runner.output
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / f"operator-{self.name}.log").write_text(self.output)

    def liveness(self) -> int:
        try:
            return httpx.get(self.liveness_url, timeout=5).status_code
        except httpx.HTTPError:
            return 0


def decided_at(cluster: Cluster, namespace: str, name: str) -> str | None:
    """The status's `allocation.decidedAt` (None while there is none, or it cannot be read)."""
    with contextlib.suppress(Exception):
        allocation = cluster.status(namespace, name).get("allocation") or {}
        return allocation.get("decidedAt")
    return None


def decision_age(cluster: Cluster, namespace: str, name: str) -> float:
    """Seconds since the decision the status shows (inf without one)."""
    at = decided_at(cluster, namespace, name)
    if at is None:
        return math.inf
    stamp = datetime.datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    return time.time() - stamp


def next_decisions(
    cluster: Cluster,
    before: dict[tuple[str, str], str | None],
    *,
    started: float,
    timeout: float,
) -> dict[tuple[str, str], float]:
    """Per (namespace, name): seconds from `started` (monotonic) until its status shows a
    decision other than `before[...]` (inf: none within `timeout`)."""
    found: dict[tuple[str, str], float] = {}
    while len(found) < len(before) and time.monotonic() - started < timeout:
        for key, previous in before.items():
            if key not in found and decided_at(cluster, *key) not in (None, previous):
                found[key] = time.monotonic() - started
        time.sleep(0.05)
    return {key: found.get(key, math.inf) for key in before}


@contextlib.contextmanager
def sampled(fn: Any, every_s: float = 0.5) -> Iterator[list[tuple[float, Any]]]:
    """Call fn every `every_s` in a thread while the block runs: [(seconds, value)]."""
    samples: list[tuple[float, Any]] = []
    stop = threading.Event()
    started = time.monotonic()

    def run() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - started, fn()))
            stop.wait(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(10)
