"""Where the control loop's demand and queue numbers come from: Prometheus or the workers.

No Kubernetes here: the operator and the one-machine mode share these sources. Both answer the
same question for one cascade: the arrival rate at the first stage (the cascade's demand) and,
per stage, the summed queue depth and arrival rate.

Labels: every worker series carries `cascade` and `variant` (see the worker's protocol module);
the PromQL filters on them. Two cascades with the same name in different namespaces can only be
told apart when Prometheus attaches the pod's namespace as a label (the usual
`kubernetes_sd_configs` relabelling does); name that label with `namespace_label` (off by
default, because a static scrape config has no such label and the filter would match nothing).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import httpx
from diffcascade_worker.protocol import (
    ARRIVALS,
    BATCH_SECONDS,
    COMPLETIONS,
    GATE_CONFIDENCE,
    LABEL_BATCH_SIZE,
    LABEL_CASCADE,
    LABEL_OUTCOME,
    LABEL_VARIANT,
    LATENCY_SECONDS,
    QUEUE_DEPTH,
    ROUTER_ROUTED,
)
from prometheus_client.parser import text_string_to_metric_families

from diffcascade_operator.live_profiles import (
    BatchStat,
    LiveObservations,
    LiveProfileError,
    LiveTracker,
    VariantTotals,
    histogram_from_buckets,
)
from diffcascade_operator.measured_slo import EntryTotals, SloObservations, SloWindow, entry_totals
from diffcascade_operator.snapshot import StageSample

SourceName = Literal["Prometheus", "DirectScrape"]

#: The label that tells the parts of the one live-profile query apart, and its values.
_STAT = "diffcascade_stat"
_LIVE_TAGS = ("bucket", "count", "sum")
_SLO_TAGS = ("latency", "outcome")


class MetricsUnavailable(RuntimeError):
    """No usable reading: the source cannot be reached or has no data for the cascade."""


@dataclass(frozen=True)
class MetricsReading:
    demand_qps: float  # arrivals at the first stage
    stages: dict[str, StageSample]  # by variant name
    source: SourceName
    at: float  # wall-clock seconds of the reading
    #: Per variant, the arrival rate over the control interval (every arrival in it); None
    #: when the source has only `stages`' rates (which then count every arrival themselves).
    window_qps: Mapping[str, float] | None = None
    #: Every arrival of the cascade (its router's counter), whatever stage it entered at: the
    #: instant rate and the rate over the control interval; None without a router series.
    cascade_qps: float | None = None
    cascade_window_qps: float | None = None
    window_s: float = 0.0  # the span the window rates cover


class MetricsSource(Protocol):
    def read(
        self, *, cascade: str, variants: Sequence[str], namespace: str | None = None
    ) -> MetricsReading: ...


class LiveSource(Protocol):
    """A source of the live-profile histograms (every source here is one)."""

    def read_live(
        self,
        *,
        cascade: str,
        variants: Sequence[str],
        window_s: float,
        namespace: str | None = None,
    ) -> LiveObservations: ...


def _totals(
    buckets: Mapping[float, float], batches: Mapping[int, tuple[float, float]]
) -> VariantTotals:
    """VariantTotals from {le: count} and {batch size: (count, seconds)}; bad rows are dropped."""
    try:
        confidence = histogram_from_buckets(buckets) if buckets else None
    except LiveProfileError:
        confidence = None
    return VariantTotals(
        confidence=confidence,
        batches={b: BatchStat(_finite(c), _finite(sec)) for b, (c, sec) in batches.items()},
    )


def _batch_size(labels: Mapping[str, str]) -> int | None:
    try:
        size = int(labels.get(LABEL_BATCH_SIZE, ""))
    except ValueError:
        return None
    return size if size >= 1 else None


def _finite(value: float) -> float:
    return value if math.isfinite(value) and value >= 0.0 else 0.0


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class PrometheusSource:
    """PromQL through prometheus-api-client: a few instant queries per reading.

    Arrival rates use `irate`: the rate between the last two scrapes, so a demand step shows
    one scrape after it happens instead of being averaged in over a whole window. Smoothing
    is the demand estimator's job (EWMA, trend and step rule in `demand.py`), where it is
    tested and configurable. `window_s` only bounds how old those two scrapes may be: it must
    span at least two scrapes (four is safer), so a 15 s scrape interval wants 60 s.

    With `demand_window_s` (the control interval) the reading also carries `rate` over that
    window, so the demand counts every arrival since the last step, not the last scrape's
    (absent when the window holds fewer than two scrapes: `irate` then spans more than the
    interval anyway). The cascade's router counter, when scraped, gives the cascade's own
    arrivals whatever stage a plan enters at.
    """

    def __init__(
        self,
        url: str,
        *,
        window_s: float = 60.0,
        timeout_s: float = 2.0,
        namespace_label: str | None = None,
        clock: Callable[[], float] = time.time,
        demand_window_s: float | None = None,
    ) -> None:
        from prometheus_api_client import PrometheusConnect
        from urllib3.util.retry import Retry

        self.url = url.rstrip("/")
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.namespace_label = namespace_label
        self.demand_window_s = demand_window_s
        self._clock = clock
        # One quick retry at most: a dead Prometheus must turn into a fallback within a tick.
        self._client = PrometheusConnect(
            self.url,
            disable_ssl=True,
            retry=Retry(total=1, connect=1, read=0, backoff_factor=0.0),
            timeout=timeout_s,  # type: ignore[arg-type]
        )

    def _selector(self, cascade: str, namespace: str | None) -> str:
        parts = [f'{LABEL_CASCADE}="{_quote(cascade)}"']
        if self.namespace_label and namespace:
            parts.append(f'{self.namespace_label}="{_quote(namespace)}"')
        return ",".join(parts)

    def queries(self, *, cascade: str, namespace: str | None = None) -> tuple[str, str]:
        """(arrival rate by variant, queue depth by variant): the PromQL this source sends."""
        sel = self._selector(cascade, namespace)
        window = f"{max(1, round(self.window_s))}s"
        return (
            f"sum by ({LABEL_VARIANT}) (irate({ARRIVALS.exposed}{{{sel}}}[{window}]))",
            f"sum by ({LABEL_VARIANT}) ({QUEUE_DEPTH.exposed}{{{sel}}})",
        )

    def demand_queries(
        self, *, cascade: str, namespace: str | None = None
    ) -> tuple[str | None, str, str | None]:
        """(arrival rate by variant over the control interval, the router's instant rate,
        the router's rate over the control interval): None without `demand_window_s`."""
        sel = self._selector(cascade, namespace)
        window = f"{max(1, round(self.window_s))}s"
        routed = f"{ROUTER_ROUTED.exposed}{{{sel}}}"
        instant = f"sum(irate({routed}[{window}]))"
        if self.demand_window_s is None:
            return None, instant, None
        interval = f"{max(1, math.ceil(self.demand_window_s))}s"
        return (
            f"sum by ({LABEL_VARIANT}) (rate({ARRIVALS.exposed}{{{sel}}}[{interval}]))",
            instant,
            f"sum(rate({routed}[{interval}]))",
        )

    def _total(self, promql: str | None) -> float | None:
        """The value of a query with one unlabelled row; None when it has none."""
        if promql is None:
            return None
        rows = self._rows(promql)
        return rows[0][1] if rows else None

    def _query(self, promql: str) -> dict[str, float]:
        """One value per variant (`_rows`, keyed by the variant label)."""
        return {
            labels[LABEL_VARIANT]: value
            for labels, value in self._rows(promql)
            if LABEL_VARIANT in labels
        }

    def read(
        self, *, cascade: str, variants: Sequence[str], namespace: str | None = None
    ) -> MetricsReading:
        if not variants:
            raise ValueError("a cascade has at least one variant")
        rate_q, depth_q = self.queries(cascade=cascade, namespace=namespace)
        depths = self._query(depth_q)
        if not depths:
            raise MetricsUnavailable(
                f"Prometheus at {self.url} has no {QUEUE_DEPTH.exposed} series for "
                f"cascade {cascade!r} (not scraped yet, or a label mismatch)"
            )
        rates = self._query(rate_q)
        if variants[0] not in rates:
            raise MetricsUnavailable(
                f"Prometheus at {self.url} has no arrival rate for {cascade}/{variants[0]} yet"
            )
        stages = {
            v: StageSample(queue_depth=depths.get(v, 0.0), arrival_qps=rates.get(v, 0.0))
            for v in variants
        }
        window_q, cascade_q, cascade_window_q = self.demand_queries(
            cascade=cascade, namespace=namespace
        )
        window = self._query(window_q) if window_q is not None else {}
        return MetricsReading(
            demand_qps=rates[variants[0]],
            stages=stages,
            source="Prometheus",
            at=self._clock(),
            window_qps={v: window.get(v, 0.0) for v in variants} if window else None,
            cascade_qps=self._total(cascade_q),
            cascade_window_qps=self._total(cascade_window_q),
            window_s=float(math.ceil(self.demand_window_s or 0.0)),
        )

    def live_queries(
        self, *, cascade: str, window_s: float, namespace: str | None = None
    ) -> tuple[str, str, str]:
        """(confidence buckets, batch counts, batch seconds): increases over the live window."""
        sel = self._selector(cascade, namespace)
        window = f"{max(1, round(window_s))}s"
        conf, batch = GATE_CONFIDENCE.name, BATCH_SECONDS.name
        by_size = f"{LABEL_VARIANT}, {LABEL_BATCH_SIZE}"
        return (
            f"sum by ({LABEL_VARIANT}, le) (increase({conf}_bucket{{{sel}}}[{window}]))",
            f"sum by ({by_size}) (increase({batch}_count{{{sel}}}[{window}]))",
            f"sum by ({by_size}) (increase({batch}_sum{{{sel}}}[{window}]))",
        )

    def live_query(self, *, cascade: str, window_s: float, namespace: str | None = None) -> str:
        """The three `live_queries` as one instant query (one round trip a control step): each
        part tagged with a `stat` label, joined with `or` (their label sets differ)."""
        parts = self.live_queries(cascade=cascade, window_s=window_s, namespace=namespace)
        return " or ".join(
            f'label_replace({q}, "{_STAT}", "{tag}", "", "")'
            for q, tag in zip(parts, _LIVE_TAGS, strict=True)
        )

    def _rows(self, promql: str) -> list[tuple[dict[str, str], float]]:
        try:
            result: list[dict[str, Any]] = self._client.custom_query(promql)
        except Exception as exc:  # requests' and the client's errors alike
            raise MetricsUnavailable(f"Prometheus at {self.url}: {exc}") from exc
        rows = []
        for row in result:
            try:
                # As answered: a reading that no worker could produce (NaN, a negative rate)
                # is refused as a whole by `snapshot_builder.read_metrics`, not read as 0.
                rows.append((dict(row.get("metric", {})), float(row["value"][1])))
            except (KeyError, IndexError, TypeError, ValueError):
                continue
        return rows

    def read_live(
        self,
        *,
        cascade: str,
        variants: Sequence[str],
        window_s: float,
        namespace: str | None = None,
    ) -> LiveObservations:
        """Histogram increases over `window_s`, by variant (empty ones when nothing ran)."""
        rows = self._rows(self.live_query(cascade=cascade, window_s=window_s, namespace=namespace))
        buckets: dict[str, dict[float, float]] = {v: {} for v in variants}
        batches: dict[str, dict[int, tuple[float, float]]] = {v: {} for v in variants}
        for labels, value in rows:
            variant, tag = labels.get(LABEL_VARIANT), labels.get(_STAT)
            if variant not in buckets:
                continue
            if tag == _LIVE_TAGS[0]:
                try:
                    buckets[variant][float(labels.get("le", ""))] = _finite(value)
                except ValueError:
                    continue
            elif tag in _LIVE_TAGS[1:] and (size := _batch_size(labels)) is not None:
                pair = list(batches[variant].get(size, (0.0, 0.0)))
                pair[_LIVE_TAGS.index(tag) - 1] = value
                batches[variant][size] = (pair[0], pair[1])
        return LiveObservations(
            variants={v: _totals(buckets[v], batches[v]) for v in variants},
            window_s=window_s,
            source="Prometheus",
            at=self._clock(),
        )

    def slo_query(
        self, *, cascade: str, variant: str, window_s: float, namespace: str | None = None
    ) -> str:
        """The entry stage's latency buckets and outcomes over the window, as one query."""
        sel = f'{self._selector(cascade, namespace)},{LABEL_VARIANT}="{_quote(variant)}"'
        window = f"{max(1, round(window_s))}s"
        parts = (
            f"sum by (le) (increase({LATENCY_SECONDS.name}_bucket{{{sel}}}[{window}]))",
            f"sum by ({LABEL_OUTCOME}) (increase({COMPLETIONS.exposed}{{{sel}}}[{window}]))",
        )
        return " or ".join(
            f'label_replace({q}, "{_STAT}", "{tag}", "", "")'
            for q, tag in zip(parts, _SLO_TAGS, strict=True)
        )

    def read_slo(
        self, *, cascade: str, variant: str, window_s: float, namespace: str | None = None
    ) -> SloObservations:
        """What the entry stage answered, and how fast, over `window_s` (see measured_slo)."""
        rows = self._rows(
            self.slo_query(cascade=cascade, variant=variant, window_s=window_s, namespace=namespace)
        )
        if not rows:
            raise MetricsUnavailable(
                f"Prometheus at {self.url} has no {LATENCY_SECONDS.name} series for "
                f"{cascade}/{variant} yet"
            )
        buckets: dict[float, float] = {}
        outcomes: dict[str, float] = {}
        for labels, value in rows:
            tag = labels.get(_STAT)
            if tag == _SLO_TAGS[0]:
                try:
                    buckets[float(labels.get("le", ""))] = value
                except ValueError:
                    continue
            elif tag == _SLO_TAGS[1] and labels.get(LABEL_OUTCOME):
                outcomes[labels[LABEL_OUTCOME]] = value
        return SloObservations(
            totals=entry_totals(buckets, outcomes),
            window_s=window_s,
            source="Prometheus",
            at=self._clock(),
        )


@dataclass(frozen=True)
class WorkerSample:
    """What one worker's (or router's) /metrics said, summed over the series of one cascade."""

    arrivals_total: float
    queue_depth: float
    inflight: float
    at: float
    routed_total: float = 0.0  # a router's count of every arrival (ROUTER_ROUTED)


def parse_worker_metrics(text: str, *, cascade: str | None = None, at: float = 0.0) -> WorkerSample:
    """Sum the arrival counters and queue gauges of a /metrics page (optionally one cascade)."""
    from diffcascade_worker.protocol import INFLIGHT

    arrivals = depth = inflight = routed = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if cascade is not None and sample.labels.get(LABEL_CASCADE) != cascade:
                continue
            if sample.name == ARRIVALS.exposed:
                arrivals += sample.value
            elif sample.name == QUEUE_DEPTH.exposed:
                depth += sample.value
            elif sample.name == INFLIGHT.exposed:
                inflight += sample.value
            elif sample.name == ROUTER_ROUTED.exposed:
                routed += sample.value
    return WorkerSample(
        arrivals_total=arrivals, queue_depth=depth, inflight=inflight, at=at, routed_total=routed
    )


def _rate(
    before: WorkerSample | None, now: WorkerSample, count: Callable[[WorkerSample], float]
) -> tuple[float, float] | None:
    """(rate, span) of one counter between two samples of one target; None without a span. A
    counter that went down means the process restarted: its count began again."""
    if before is None or now.at <= before.at:
        return None
    delta = count(now) - count(before)
    if delta < 0:
        delta = count(now)
    return delta / (now.at - before.at), now.at - before.at


def _arrivals(sample: WorkerSample) -> float:
    return sample.arrivals_total


def _routed(sample: WorkerSample) -> float:
    return sample.routed_total


def parse_live_totals(text: str, *, cascade: str | None = None) -> dict[str, VariantTotals]:
    """Cumulative gate-confidence buckets and batch latency by size of a /metrics page."""
    buckets: dict[str, dict[float, float]] = {}
    batches: dict[str, dict[int, tuple[float, float]]] = {}
    conf_bucket = f"{GATE_CONFIDENCE.name}_bucket"
    count_name, sum_name = f"{BATCH_SECONDS.name}_count", f"{BATCH_SECONDS.name}_sum"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if cascade is not None and labels.get(LABEL_CASCADE) != cascade:
                continue
            variant = labels.get(LABEL_VARIANT)
            if variant is None:
                continue
            if sample.name == conf_bucket and "le" in labels:
                try:
                    le = float(labels["le"])
                except ValueError:
                    continue
                per = buckets.setdefault(variant, {})
                per[le] = per.get(le, 0.0) + sample.value
            elif sample.name in (count_name, sum_name):
                size = _batch_size(labels)
                if size is None:
                    continue
                per_size = batches.setdefault(variant, {})
                count, seconds = per_size.get(size, (0.0, 0.0))
                if sample.name == count_name:
                    count += sample.value
                else:
                    seconds += sample.value
                per_size[size] = (count, seconds)
    return {v: _totals(buckets.get(v, {}), batches.get(v, {})) for v in {*buckets, *batches}}


def parse_entry_totals(text: str, *, cascade: str | None, variant: str) -> EntryTotals:
    """Cumulative latency buckets and outcome counts of one variant on a /metrics page."""
    buckets: dict[float, float] = {}
    outcomes: dict[str, float] = {}
    bucket_name, completed = f"{LATENCY_SECONDS.name}_bucket", COMPLETIONS.exposed
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get(LABEL_VARIANT) != variant:
                continue
            if cascade is not None and labels.get(LABEL_CASCADE) != cascade:
                continue
            if sample.name == bucket_name and "le" in labels:
                try:
                    le = float(labels["le"])
                except ValueError:
                    continue
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == completed and labels.get(LABEL_OUTCOME):
                outcome = labels[LABEL_OUTCOME]
                outcomes[outcome] = outcomes.get(outcome, 0.0) + sample.value
    return entry_totals(buckets, outcomes)


class ScrapeSource:
    """Reads every worker's /metrics directly; rates from counter deltas between reads.

    `endpoints()` maps each variant to its workers' base URLs (e.g. `http://10.0.0.5:8000`).
    A worker seen for the first time has no rate yet; when no worker of the first stage has one,
    the source scrapes twice, `first_gap_s` apart, so a first reading is still a measurement.
    `routers()`, when given, lists the base URLs of the cascade's routers: their count of every
    arrival is the reading's `cascade_qps`, as Prometheus' router series is.
    """

    def __init__(
        self,
        endpoints: Callable[[], Mapping[str, Sequence[str]]],
        *,
        timeout_s: float = 1.0,
        first_gap_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        client: httpx.Client | None = None,
        routers: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._routers = routers or (lambda: ())
        self._timeout_s = timeout_s
        self._first_gap_s = first_gap_s
        self._clock = clock
        self._client = client or httpx.Client(timeout=timeout_s)
        self._previous: dict[str, WorkerSample] = {}
        self._live: LiveTracker | None = None  # histogram windows, per (variant, url)
        self._slo: SloWindow | None = None  # the entry stage's latency windows, per url
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scrape")

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()

    def scrape(self, url: str, *, cascade: str | None = None) -> WorkerSample | None:
        """One worker's sample, or None when it does not answer."""
        text = self._scrape_text(url)
        return (
            None if text is None else parse_worker_metrics(text, cascade=cascade, at=self._clock())
        )

    def _scrape_all(self, urls: Sequence[str], cascade: str) -> dict[str, WorkerSample]:
        samples = self._pool.map(lambda u: (u, self.scrape(u, cascade=cascade)), urls)
        return {u: s for u, s in samples if s is not None}

    def read(
        self, *, cascade: str, variants: Sequence[str], namespace: str | None = None
    ) -> MetricsReading:
        if not variants:
            raise ValueError("a cascade has at least one variant")
        endpoints = {v: list(self._endpoints().get(v, ())) for v in variants}
        workers = sorted({u for us in endpoints.values() for u in us})
        if not workers:
            raise MetricsUnavailable(f"no worker endpoints to scrape for cascade {cascade!r}")
        routers = sorted(set(self._routers()) - set(workers))
        urls = [*workers, *routers]
        with self._lock:
            current = self._scrape_all(urls, cascade)
            if not any(u in current for u in workers):
                raise MetricsUnavailable(
                    f"none of the {len(workers)} workers of {cascade!r} answered"
                )
            first = [u for u in [*endpoints[variants[0]], *routers] if u in current]
            if first and not any(u in self._previous for u in first):
                for url in current:
                    self._previous[url] = current[url]
                time.sleep(self._first_gap_s)
                current = self._scrape_all(urls, cascade) or current
            stages: dict[str, StageSample] = {}
            spans: list[float] = []
            for variant in variants:
                depth = rate = 0.0
                for url in endpoints[variant]:
                    now = current.get(url)
                    if now is None:
                        continue
                    depth += now.queue_depth
                    if (measured := _rate(self._previous.get(url), now, _arrivals)) is None:
                        continue
                    rate += measured[0]
                    spans.append(measured[1])
                stages[variant] = StageSample(queue_depth=depth, arrival_qps=rate)
            routed = [
                measured
                for url in routers
                if (now := current.get(url)) is not None
                and (measured := _rate(self._previous.get(url), now, _routed)) is not None
            ]
            self._previous.update(current)
            for gone in set(self._previous) - set(urls):
                del self._previous[gone]
        # counter deltas between reads: every arrival since the last step already
        cascade_qps = sum(rate for rate, _ in routed) if routed else None
        return MetricsReading(
            demand_qps=stages[variants[0]].arrival_qps,
            stages=stages,
            source="DirectScrape",
            at=self._clock(),
            window_qps={v: stage.arrival_qps for v, stage in stages.items()},
            cascade_qps=cascade_qps,
            cascade_window_qps=cascade_qps,
            window_s=max([*spans, *(span for _, span in routed)], default=0.0),
        )

    def _scrape_text(self, url: str) -> str | None:
        """A worker's /metrics page, or None when it does not answer."""
        try:
            response = self._client.get(f"{url.rstrip('/')}/metrics", timeout=self._timeout_s)
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        return response.text

    def read_live(
        self,
        *,
        cascade: str,
        variants: Sequence[str],
        window_s: float,
        namespace: str | None = None,
    ) -> LiveObservations:
        """Scrape every worker, keep its cumulative totals, sum their increases over the window.

        A worker's first scrape only sets its baseline, so the window fills from the first
        call on (Prometheus keeps history; this fallback has only what it saw).
        """
        endpoints = {v: list(self._endpoints().get(v, ())) for v in variants}
        urls = sorted({u for us in endpoints.values() for u in us})
        if not urls:
            raise MetricsUnavailable(f"no worker endpoints to scrape for cascade {cascade!r}")
        texts = dict(self._pool.map(lambda u: (u, self._scrape_text(u)), urls))
        if not any(texts.values()):
            raise MetricsUnavailable(f"none of the {len(urls)} workers of {cascade!r} answered")
        totals: dict[tuple[str, str], VariantTotals | None] = {}
        for variant, variant_urls in endpoints.items():
            for url in variant_urls:
                text = texts.get(url)
                seen = parse_live_totals(text, cascade=cascade) if text is not None else None
                totals[(variant, url)] = (
                    None if seen is None else seen.get(variant) or VariantTotals()
                )
        with self._lock:
            if self._live is None or self._live.window_s != window_s:
                self._live = LiveTracker(window_s, source="DirectScrape")
            return self._live.observe(now=self._clock(), variants=variants, totals=totals)

    def read_slo(
        self, *, cascade: str, variant: str, window_s: float, namespace: str | None = None
    ) -> SloObservations:
        """The entry stage's workers scraped; their increases over the window summed (a
        worker's first scrape only sets its baseline)."""
        urls = sorted(set(self._endpoints().get(variant, ())))
        if not urls:
            raise MetricsUnavailable(f"no {variant} workers of {cascade!r} to scrape")
        texts = dict(self._pool.map(lambda u: (u, self._scrape_text(u)), urls))
        if not any(texts.values()):
            raise MetricsUnavailable(f"none of the {len(urls)} {variant} workers answered")
        totals = {
            url: None
            if text is None
            else parse_entry_totals(text, cascade=cascade, variant=variant)
            for url, text in texts.items()
        }
        with self._lock:
            if self._slo is None or self._slo.window_s != window_s:
                self._slo = SloWindow(window_s)
            now = self._clock()
            summed = self._slo.observe(now=now, totals=totals)
        return SloObservations(totals=summed, window_s=window_s, source="DirectScrape", at=now)


def live_source_for(source: MetricsSource | None, reading: MetricsReading | None) -> object | None:
    """Where to read this step's histograms: the source that just answered `read()` (so a
    Prometheus that is down is not waited on twice), None when none did."""
    if reading is None or source is None:
        return None
    if reading.source == "DirectScrape" and isinstance(source, FallbackSource):
        return source.fallback
    return source


class FallbackSource:
    """Asks `primary` first and `fallback` when it fails; `last_error` says why it fell back."""

    def __init__(self, primary: MetricsSource, fallback: MetricsSource) -> None:
        self.primary = primary
        self.fallback = fallback
        self.last_error: str | None = None

    def read(
        self, *, cascade: str, variants: Sequence[str], namespace: str | None = None
    ) -> MetricsReading:
        try:
            reading = self.primary.read(cascade=cascade, variants=variants, namespace=namespace)
        except MetricsUnavailable as primary_error:
            self.last_error = str(primary_error)
            try:
                return self.fallback.read(cascade=cascade, variants=variants, namespace=namespace)
            except MetricsUnavailable as fallback_error:
                raise MetricsUnavailable(f"{primary_error}; fallback: {fallback_error}") from None
        self.last_error = None
        return reading

    def read_live(
        self,
        *,
        cascade: str,
        variants: Sequence[str],
        window_s: float,
        namespace: str | None = None,
    ) -> LiveObservations:
        """The primary's histograms, else the fallback's (each must be a `LiveSource`)."""
        sources = [s for s in (self.primary, self.fallback) if hasattr(s, "read_live")]
        errors: list[str] = []
        for source in sources:
            try:
                observations: LiveObservations = source.read_live(  # type: ignore[attr-defined]
                    cascade=cascade, variants=variants, window_s=window_s, namespace=namespace
                )
            except MetricsUnavailable as exc:
                errors.append(str(exc))
                continue
            return observations
        raise MetricsUnavailable("; ".join(errors) or "no source of live histograms")

    def read_slo(
        self, *, cascade: str, variant: str, window_s: float, namespace: str | None = None
    ) -> SloObservations:
        """The primary's measurement, else the fallback's."""
        errors: list[str] = []
        for source in (self.primary, self.fallback):
            read = getattr(source, "read_slo", None)
            if read is None:
                continue
            try:
                observed: SloObservations = read(
                    cascade=cascade, variant=variant, window_s=window_s, namespace=namespace
                )
            except MetricsUnavailable as exc:
                errors.append(str(exc))
                continue
            return observed
        raise MetricsUnavailable("; ".join(errors) or "no source of latency histograms")
