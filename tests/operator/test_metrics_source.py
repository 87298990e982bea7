"""Metrics sources against real HTTP: a /metrics page made by prometheus_client, a dead port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from diffcascade_operator.metrics_source import (
    FallbackSource,
    MetricsUnavailable,
    PrometheusSource,
    ScrapeSource,
)
from diffcascade_worker.protocol import ARRIVALS, INFLIGHT, QUEUE_DEPTH
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class FakeWorker:
    """A worker's metric families (the protocol's names and labels) behind real HTTP."""

    def __init__(self, variant: str, cascade: str = "c") -> None:
        self.registry = CollectorRegistry()
        labels = ["cascade", "variant"]
        self.arrivals = Counter(ARRIVALS.name, ARRIVALS.help, labels, registry=self.registry)
        self.depth = Gauge(QUEUE_DEPTH.name, QUEUE_DEPTH.help, labels, registry=self.registry)
        self.inflight = Gauge(INFLIGHT.name, INFLIGHT.help, labels, registry=self.registry)
        self.key = (cascade, variant)
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arrive(self, n: float) -> None:
        self.arrivals.labels(*self.key).inc(n)

    def queue(self, n: float) -> None:
        self.depth.labels(*self.key).set(n)


@pytest.fixture
def fleet() -> Iterator[dict[str, FakeWorker]]:
    workers = {"a": FakeWorker("light"), "b": FakeWorker("light"), "h": FakeWorker("heavy")}
    yield workers
    for w in workers.values():
        w.server.shutdown()


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_scrape_source_sums_replicas_and_rates_counter_deltas(
    fleet: dict[str, FakeWorker],
) -> None:
    clock = Clock()
    endpoints = {"light": [fleet["a"].url, fleet["b"].url], "heavy": [fleet["h"].url]}
    source = ScrapeSource(lambda: endpoints, clock=clock, first_gap_s=0.0)
    source.read(cascade="c", variants=["light", "heavy"])
    fleet["a"].arrive(10)
    fleet["b"].arrive(20)
    fleet["h"].arrive(5)
    fleet["a"].queue(3)
    fleet["h"].queue(1)
    clock.now += 10.0
    reading = source.read(cascade="c", variants=["light", "heavy"])
    assert reading.source == "DirectScrape"
    assert reading.demand_qps == pytest.approx(3.0)
    assert reading.stages["light"].queue_depth == 3
    assert reading.stages["heavy"].arrival_qps == pytest.approx(0.5)


def test_scrape_source_measures_on_its_first_read_and_ignores_other_cascades(
    fleet: dict[str, FakeWorker],
) -> None:
    other = FakeWorker("light", cascade="other")
    fleet["a"].arrive(1)
    source = ScrapeSource(lambda: {"light": [fleet["a"].url, other.url]}, first_gap_s=0.3)
    feeder = threading.Timer(0.1, lambda: (fleet["a"].arrive(3), other.arrive(100)))
    feeder.start()
    reading = source.read(cascade="c", variants=["light"])
    other.server.shutdown()
    assert reading.demand_qps * 0.3 * 1.5 >= 3.0  # about 3 arrivals over ~0.3 s
    assert reading.demand_qps < 100  # the other cascade's arrivals do not count


def test_scrape_source_without_answering_workers_is_unavailable() -> None:
    source = ScrapeSource(lambda: {"light": [_dead_url()]}, timeout_s=0.5)
    with pytest.raises(MetricsUnavailable, match="answered"):
        source.read(cascade="c", variants=["light"])
    with pytest.raises(MetricsUnavailable, match="no worker endpoints"):
        ScrapeSource(lambda: {}).read(cascade="c", variants=["light"])


def test_prometheus_source_queries_filter_on_cascade_and_optionally_namespace() -> None:
    plain = PrometheusSource("http://prom:9090", window_s=30)
    rate, depth = plain.queries(cascade="c1", namespace="images")
    assert rate == (
        'sum by (variant) (irate(diffcascade_arrived_requests_total{cascade="c1"}[30s]))'
    )
    assert depth == 'sum by (variant) (diffcascade_queue_depth{cascade="c1"})'
    scoped = PrometheusSource("http://prom:9090", namespace_label="namespace")
    assert 'namespace="images"' in scoped.queries(cascade="c1", namespace="images")[0]


def test_unreachable_prometheus_falls_back_to_scraping_and_says_why(
    fleet: dict[str, FakeWorker],
) -> None:
    started = time.monotonic()
    prometheus = PrometheusSource(_dead_url(), timeout_s=1.0)
    with pytest.raises(MetricsUnavailable, match="Prometheus"):
        prometheus.read(cascade="c", variants=["light"])
    assert time.monotonic() - started < 5
    fallback = FallbackSource(
        prometheus, ScrapeSource(lambda: {"light": [fleet["a"].url]}, first_gap_s=0.0)
    )
    reading = fallback.read(cascade="c", variants=["light"])
    assert reading.source == "DirectScrape"
    assert fallback.last_error is not None and "Prometheus" in fallback.last_error


# --- live-profile histograms (gate confidence, batch latency by size) --------------------------


class WorkerPage:
    """The real worker's metrics (diffcascade_worker.serving.metrics) behind real HTTP."""

    def __init__(self, variant: str, cascade: str = "c") -> None:
        from diffcascade_worker.serving.metrics import WorkerMetrics

        self.metrics = WorkerMetrics(cascade=cascade, variant=variant)
        metrics = self.metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = metrics.exposition()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def batch(self, confidences: list[float], seconds: float) -> None:
        self.metrics.batch_latency(len(confidences)).observe(seconds)
        for value in confidences:
            self.metrics.gate_confidence.observe(value)


def test_scrape_source_reads_histogram_increases_over_the_window() -> None:
    pages = [WorkerPage("light"), WorkerPage("light")]
    clock = Clock()
    source = ScrapeSource(
        lambda: {"light": [p.url for p in pages], "heavy": []}, clock=clock, first_gap_s=0.0
    )
    try:
        pages[0].batch([0.9, 0.9], 0.2)  # before the first scrape: baseline, not counted
        first = source.read_live(cascade="c", variants=["light", "heavy"], window_s=10.0)
        assert first.variants["light"].confidence is not None
        assert first.variants["light"].confidence.samples == 0
        for page in pages:
            page.batch([0.01, 0.02], 0.3)
            page.batch([0.03], 0.1)
        clock.now += 5.0
        later = source.read_live(cascade="c", variants=["light", "heavy"], window_s=10.0)
        light = later.variants["light"]
        assert light.confidence is not None and light.confidence.samples == 6
        assert light.batches[2].batches == 2 and light.batches[2].mean_ms == pytest.approx(300.0)
        assert light.batches[1].batches == 2 and later.source == "DirectScrape"
        assert later.variants["heavy"].confidence is None
        clock.now += 11.0  # the window slid past everything: nothing new arrived since
        idle = source.read_live(cascade="c", variants=["light", "heavy"], window_s=10.0)
        assert idle.variants["light"].confidence is not None
        assert idle.variants["light"].confidence.samples == 0
    finally:
        source.close()
        for page in pages:
            page.server.shutdown()


def test_prometheus_live_queries_are_window_increases_by_variant() -> None:
    source = PrometheusSource("http://prom:9090", namespace_label="namespace")
    conf, count, seconds = source.live_queries(cascade="c", window_s=120, namespace="ns")
    assert conf == (
        'sum by (variant, le) (increase(diffcascade_gate_confidence_bucket{cascade="c",'
        'namespace="ns"}[120s]))'
    )
    assert "increase(diffcascade_batch_latency_seconds_count{" in count
    assert "by (variant, batch_size)" in count and "_sum{" in seconds


def test_unreachable_prometheus_falls_back_to_scraping_for_histograms() -> None:
    page = WorkerPage("light")
    scrape = ScrapeSource(lambda: {"light": [page.url]})
    fallback = FallbackSource(PrometheusSource(_dead_url(), timeout_s=1.0), scrape)
    try:
        seen = fallback.read_live(cascade="c", variants=["light"], window_s=30.0)
        assert seen.source == "DirectScrape"
    finally:
        scrape.close()
        page.server.shutdown()


def test_scrape_source_measures_the_entry_stages_slo_over_the_window() -> None:
    from diffcascade_operator.measured_slo import measure
    from diffcascade_worker.protocol import Outcome

    clock = Clock()
    pages = [WorkerPage("light"), WorkerPage("light"), WorkerPage("heavy")]
    endpoints = {"light": [pages[0].url, pages[1].url], "heavy": [pages[2].url]}
    source = ScrapeSource(lambda: endpoints, clock=clock)
    try:
        first = source.read_slo(cascade="c", variant="light", window_s=30.0)
        assert first.totals.outcomes == {}  # a first scrape only sets the baseline
        for page, seconds in ((pages[0], 0.4), (pages[1], 4.0)):
            for _ in range(10):
                page.metrics.latency.observe(seconds)
                page.metrics.completed(Outcome.SERVED)
        pages[1].metrics.completed(Outcome.DROPPED, 5)
        pages[2].metrics.latency.observe(50.0)  # the heavy stage's own latency: not counted
        clock.now += 5.0
        seen = source.read_slo(cascade="c", variant="light", window_s=30.0)
        measured = measure(seen, slo_s=3.0)
        assert (measured.requests, measured.late, measured.dropped) == (25.0, 10.0, 5.0)
        assert measured.violation_ratio == pytest.approx(15 / 25)
    finally:
        source.close()
        for page in pages:
            page.server.shutdown()


def test_prometheus_slo_query_reads_the_entry_stage_only() -> None:
    source = PrometheusSource("http://prom:9090")
    query = source.slo_query(cascade="c", variant="light", window_s=60)
    assert 'increase(diffcascade_request_latency_seconds_bucket{cascade="c",variant="light"}' in (
        query
    )
    assert "sum by (outcome) (increase(diffcascade_completed_requests_total{" in query


def test_prometheus_source_counts_every_arrival_of_the_interval_and_the_routers() -> None:
    source = PrometheusSource("http://prom:9090", window_s=30, demand_window_s=5)
    window, instant, cascade_window = source.demand_queries(cascade="c1")
    assert window == (
        'sum by (variant) (rate(diffcascade_arrived_requests_total{cascade="c1"}[5s]))'
    )
    assert instant == 'sum(irate(diffcascade_router_routed_images_total{cascade="c1"}[30s]))'
    assert cascade_window == 'sum(rate(diffcascade_router_routed_images_total{cascade="c1"}[5s]))'
    assert PrometheusSource("http://prom:9090").demand_queries(cascade="c1")[0] is None
