"""Live profiles: f(t) from histogram buckets, blending by sample count, live latency, drift."""

from __future__ import annotations

import math
import random

import pytest
from diffcascade_operator.kube import status as st
from diffcascade_operator.kube.reconcile import drift_events
from diffcascade_operator.live_profiles import (
    BatchStat,
    CumulativeWindow,
    HistogramRecorder,
    LiveObservations,
    LiveProfileError,
    LiveProfileSettings,
    LiveTracker,
    VariantTotals,
    blend_curves,
    blend_weight,
    confidence_histogram,
    defer_curve_from_histogram,
    drift_distance,
    histogram_from_buckets,
    live_latency_table,
    live_profiles,
)
from diffcascade_operator.metrics_source import parse_live_totals
from diffcascade_operator.profiles import (
    THRESHOLD_GRID,
    CascadeProfiles,
    VariantProfile,
    defer_curve_from_scores,
    defer_fraction,
    reference_confidences,
)
from diffcascade_worker.protocol import GATE_CONFIDENCE_BUCKETS
from diffcascade_worker.serving.metrics import WorkerMetrics

SETTINGS = LiveProfileSettings()


def _max_error(confidences: tuple[float, ...], bounds: tuple[float, ...]) -> float:
    exact = defer_curve_from_scores(confidences)
    derived = defer_curve_from_histogram(confidence_histogram(confidences, bounds=bounds))
    return max(abs(a - b) for a, b in zip(exact.fractions, derived.fractions, strict=True))


@pytest.mark.parametrize("gate", ["sd-turbo", "sdxs"])
def test_curve_from_the_worker_buckets_is_within_0_02_of_the_exact_one(gate: str) -> None:
    assert _max_error(reference_confidences(gate), GATE_CONFIDENCE_BUCKETS) <= 0.02


def test_the_old_twenty_buckets_were_too_coarse_for_sd_turbo() -> None:
    """The bound above is not vacuous: 0.05-wide buckets miss SD-Turbo's mass near 0."""
    coarse = tuple(round(0.05 * i, 2) for i in range(1, 21))
    assert _max_error(reference_confidences("sd-turbo"), coarse) > 0.1


def test_curve_through_a_real_worker_exposition_matches_the_exact_one() -> None:
    """Observed by the worker's own histogram, parsed from its /metrics text."""
    confidences = reference_confidences("sd-turbo")[:2000]
    metrics = WorkerMetrics(cascade="c", variant="light")
    for value in confidences:
        metrics.gate_confidence.observe(value)
    metrics.batch_latency(4).observe(0.25)
    metrics.batch_latency(4).observe(0.35)
    totals = parse_live_totals(metrics.exposition().decode(), cascade="c")["light"]
    assert totals.confidence is not None and totals.confidence.samples == 2000
    derived = defer_curve_from_histogram(totals.confidence)
    exact = defer_curve_from_scores(confidences)
    assert drift_distance(derived, exact) <= 0.02
    assert totals.batches[4].batches == 2 and totals.batches[4].mean_ms == pytest.approx(300.0)


def test_the_simulators_recorder_exports_what_the_worker_exports() -> None:
    """Same buckets, same `le` rule (a value on a bound counts in it), same batch stats."""
    values = [0.0, 0.005, 0.0051, 0.05, 0.3, 0.999, 1.0, *reference_confidences("sdxs")[:500]]
    metrics = WorkerMetrics(cascade="c", variant="light")
    recorder = HistogramRecorder()
    for start in range(0, len(values), 4):
        batch = values[start : start + 4]
        metrics.batch_latency(len(batch)).observe(0.125)
        for value in batch:
            metrics.gate_confidence.observe(value)
        recorder.observe_batch(size=len(batch), seconds=0.125, confidences=batch)
    worker = parse_live_totals(metrics.exposition().decode(), cascade="c")["light"]
    assert recorder.totals() == worker


def test_curve_ends_are_nothing_and_everything() -> None:
    curve = defer_curve_from_histogram(confidence_histogram([0.2, 0.4, 0.6]))
    assert curve.thresholds == THRESHOLD_GRID
    assert curve.fractions[0] == 0.0 and curve.fractions[-1] == 1.0
    assert defer_fraction(curve, 0.5) == pytest.approx(2 / 3)


def test_out_of_order_increases_become_a_monotone_histogram() -> None:
    """Prometheus extrapolates each bucket's increase on its own."""
    hist = histogram_from_buckets({0.1: 5.2, 0.2: 4.9, 1.0: 10.0, math.inf: 10.0})
    assert hist.counts == (5.2, 5.2, 10.0, 10.0)
    with pytest.raises(LiveProfileError):
        defer_curve_from_histogram(histogram_from_buckets({1.0: 0.0}))


# --- blending ----------------------------------------------------------------------------------


def _profiles(curve_confidences: list[float], latency: dict[int, float]) -> CascadeProfiles:
    return CascadeProfiles(
        variants=(
            VariantProfile("light", latency, defer_curve_from_scores(curve_confidences)),
            VariantProfile("heavy", {1: 1000.0}, None),
        ),
        quality=None,
    )


OFFLINE = [i / 100 for i in range(100)]  # uniform: f(t) = t
_RNG = random.Random(7)
HARD = [_RNG.uniform(0.0, 0.2) for _ in range(4000)]  # all below 0.2
SAME = [_RNG.random() for _ in range(2000)]  # the offline curve's distribution


def _observed(
    confidences: list[float], batches: dict[int, BatchStat] | None = None
) -> LiveObservations:
    return LiveObservations(
        variants={
            "light": VariantTotals(confidence_histogram(confidences), batches or {}),
            "heavy": VariantTotals(),
        },
        window_s=300.0,
        source="Prometheus",
        at=0.0,
    )


def _planned_f(samples: int, t: float = 0.2) -> float:
    result = live_profiles(
        _profiles(OFFLINE, {1: 100.0}), _observed(HARD[:samples]), thresholds={"light": t}
    )
    curve = result.profiles.variants[0].defer_curve
    assert curve is not None
    return defer_fraction(curve, t)


def test_few_samples_plan_with_the_offline_curve() -> None:
    assert _planned_f(SETTINGS.min_samples - 1) == pytest.approx(0.2)


def test_the_live_curve_weighs_by_sample_count() -> None:
    n0 = int(SETTINGS.prior_samples)
    assert blend_weight(n0, settings=SETTINGS) == pytest.approx(0.5)
    # f_live(0.2) = 1, f_profile(0.2) = 0.2: halfway at n = n0, close to live at 20 n0.
    assert _planned_f(n0) == pytest.approx(0.6, abs=0.01)
    assert _planned_f(4000) == pytest.approx(1.0 - 0.8 * n0 / (4000 + n0), abs=0.01)
    weights = [_planned_f(n) for n in (50, 100, 400, 1600, 4000)]
    assert weights == sorted(weights)


def test_summary_reports_samples_f_at_threshold_and_distance() -> None:
    result = live_profiles(
        _profiles(OFFLINE, {1: 100.0}), _observed(HARD), thresholds={"light": 0.1}
    )
    light, heavy = result.summaries
    assert light.samples == 4000 and light.threshold == 0.1
    assert light.f_profile == pytest.approx(0.1)
    assert light.f_live == pytest.approx(0.5, abs=0.03)
    assert light.max_distance == pytest.approx(0.8, abs=0.02)  # at t = 0.2
    assert light.drift is True and result.drift is True
    assert heavy.max_distance is None and heavy.drift is None


def test_drift_is_not_judged_on_few_samples_nor_raised_when_traffic_matches() -> None:
    few = live_profiles(
        _profiles(OFFLINE, {1: 100.0}), _observed(HARD[:100]), thresholds={"light": 0.1}
    )
    assert few.drift is None and few.max_distance is not None and few.max_distance > 0.5
    calm = live_profiles(_profiles(OFFLINE, {1: 100.0}), _observed(SAME), thresholds={})
    assert calm.drift is False and calm.max_distance is not None and calm.max_distance < 0.1


def test_no_observations_leave_the_offline_profiles_unchanged() -> None:
    offline = _profiles(OFFLINE, {1: 100.0, 2: 150.0})
    result = live_profiles(offline, None, thresholds={"light": 0.3})
    assert result.profiles == offline and result.source is None and result.drift is None


# --- latency -----------------------------------------------------------------------------------


PRIOR = {1: 100.0, 2: 150.0, 4: 220.0, 8: 410.0}


def test_latency_keeps_the_prior_until_enough_batches() -> None:
    seen = {1: BatchStat(SETTINGS.min_batches - 1, 0.3 * (SETTINGS.min_batches - 1))}
    assert live_latency_table(PRIOR, seen, min_batches=SETTINGS.min_batches) == (PRIOR, "profile")


def test_measured_latency_replaces_the_prior_and_scales_sizes_not_seen() -> None:
    seen = {1: BatchStat(40, 40 * 0.2), 2: BatchStat(30, 30 * 0.3), 3: BatchStat(25, 25 * 0.37)}
    table, source = live_latency_table(PRIOR, seen, min_batches=20)
    assert source == "mixed"
    assert table[1] == pytest.approx(200.0) and table[2] == pytest.approx(300.0)
    # every measured size ran 2x its prior (3: 370 ms vs the prior's 185), so 4 and 8 do too
    assert table[4] == pytest.approx(440.0) and table[8] == pytest.approx(820.0)


@pytest.mark.parametrize(
    "stat",
    [BatchStat(50, 0.0), BatchStat(50, 1e-30), BatchStat(50, 50 * 7200.0), BatchStat(50, math.nan)],
    ids=["count-without-sum", "microscopic", "two-hours-a-batch", "nan"],
)
def test_a_mean_no_worker_could_have_measured_is_not_trusted(stat: BatchStat) -> None:
    # A histogram with a count and no sum (a broken exporter, a Prometheus increase() artefact)
    # made every batch look free and the solver divide by zero.
    assert live_latency_table(PRIOR, {1: stat}, min_batches=20) == (PRIOR, "profile")


def test_a_scaled_table_stays_within_the_specs_latency_bounds() -> None:
    table, _ = live_latency_table(
        {1: 1.0, 8: 3_000_000.0}, {1: BatchStat(50, 50 * 2.0)}, min_batches=20
    )
    assert table == {1: 2000.0, 8: 3_600_000.0}


def test_live_profiles_plan_with_the_measured_latency() -> None:
    seen = {b: BatchStat(50, 50 * ms * 3 / 1000) for b, ms in PRIOR.items()}
    result = live_profiles(
        _profiles(OFFLINE, PRIOR), _observed(HARD[:10], seen), thresholds={"light": 0.1}
    )
    light = result.profiles.variants[0]
    assert light.batch_latency_ms == pytest.approx({b: 3 * ms for b, ms in PRIOR.items()})
    assert result.summaries[0].latency_source == "live" and result.summaries[0].batches == 200
    assert result.profiles.variants[1].batch_latency_ms == {1: 1000.0}


# --- windows -----------------------------------------------------------------------------------


def _totals(confidences: list[float], batches: float) -> VariantTotals:
    return VariantTotals(confidence_histogram(confidences), {1: BatchStat(batches, batches / 10)})


def test_window_counts_only_what_arrived_within_it() -> None:
    window = CumulativeWindow(10.0)
    window.add(0.0, _totals([0.5] * 5, 5))
    assert window.increase().confidence is not None
    assert window.increase().confidence.samples == 0  # type: ignore[union-attr]
    window.add(5.0, _totals([0.5] * 8, 8))
    window.add(12.0, _totals([0.5] * 20, 20))
    window.add(16.0, _totals([0.5] * 21, 21))
    increase = window.increase()  # since the reading at 5 s (the newest <= 16 - 10)
    assert increase.confidence is not None and increase.confidence.samples == 13
    assert increase.batches[1].batches == 13


def test_window_after_a_worker_restart_counts_from_zero() -> None:
    window = CumulativeWindow(60.0)
    window.add(0.0, _totals([0.5] * 50, 50))
    window.add(5.0, _totals([0.5] * 3, 3))
    increase = window.increase()
    assert increase.confidence is not None and increase.confidence.samples == 3
    assert increase.batches[1].batches == 3


def test_a_worker_going_away_is_not_a_counter_reset_of_its_variant() -> None:
    tracker = LiveTracker(60.0, source="Simulator")
    a, b = ("light", "a"), ("light", "b")
    tracker.observe(now=0.0, variants=["light"], totals={a: _totals([0.5] * 100, 100), b: None})
    tracker.observe(now=1.0, variants=["light"], totals={a: _totals([0.5] * 110, 110), b: None})
    seen = tracker.observe(
        now=2.0, variants=["light"], totals={b: _totals([0.5] * 4, 4)}
    )  # a is gone, b answers for the first time: its first reading is its baseline
    assert seen.variants["light"].confidence is not None
    assert seen.variants["light"].confidence.samples == 0
    later = tracker.observe(now=3.0, variants=["light"], totals={b: _totals([0.5] * 9, 9)})
    assert later.variants["light"].confidence is not None
    assert later.variants["light"].confidence.samples == 5 and later.source == "Simulator"


# --- ProfileDrift ------------------------------------------------------------------------------


def test_drift_condition_states_the_distance_and_the_window() -> None:
    drifted = live_profiles(
        _profiles(OFFLINE, {1: 100.0}), _observed(HARD), thresholds={"light": 0.1}
    )
    cond = st.profile_drift_condition(drifted)
    assert (cond.type, cond.status, cond.reason) == ("ProfileDrift", "True", "CurveDrifted")
    assert "0.8" in cond.message and "300 s window" in cond.message and "> 0.100" in cond.message
    few = live_profiles(_profiles(OFFLINE, {1: 100.0}), _observed(HARD[:50]), thresholds={})
    assert st.profile_drift_condition(few).status == "Unknown"
    doc = st.profiles_doc(drifted)
    assert doc["samples"] == 4000 and doc["drift"] is True and doc["windowSeconds"] == 300.0
    assert doc["variants"][0]["fProfile"] == pytest.approx(0.1)
    assert "drift" not in doc["variants"][1]  # absent, not null, on the ungated stage


def test_an_event_is_posted_when_drift_starts_and_when_it_ends() -> None:
    drifted = live_profiles(
        _profiles(OFFLINE, {1: 100.0}), _observed(HARD), thresholds={"light": 0.1}
    )
    calm = live_profiles(
        _profiles(OFFLINE, {1: 100.0}),
        _observed(SAME),
        thresholds={},
    )

    def status(value: str) -> dict[str, object]:
        return {"conditions": [{"type": "ProfileDrift", "status": value}]}

    assert [e[1] for e in drift_events(drifted, None, status={})] == ["ProfileDrift"]
    assert drift_events(drifted, None, status=status("True")) == []
    assert [e[1] for e in drift_events(calm, None, status=status("True"))] == ["ProfileRecovered"]
    assert drift_events(calm, None, status=status("False")) == []


# --- printing ----------------------------------------------------------------------------------


def _printed(renderable: object) -> str:
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(renderable)
    return console.export_text()


def test_status_prints_the_live_profiles_for_cluster_and_local_runs() -> None:
    from diffcascade_operator.local.cluster_status import render_cluster_status
    from diffcascade_operator.local.view import render_state

    drifted = live_profiles(
        _profiles(OFFLINE, {1: 100.0}), _observed(HARD), thresholds={"light": 0.1}
    )
    doc = st.profiles_doc(drifted)
    cluster = _printed(
        render_cluster_status(
            {
                "metadata": {"name": "c", "namespace": "ns"},
                "status": {
                    "profiles": doc,
                    "conditions": [{"type": "ProfileDrift", "status": "True"}],
                },
            }
        )
    )
    local = _printed(render_state({"cascade": "c", "profiles": doc}))
    for text in (cluster, local):
        assert "light: 4000 samples in 300 s (Prometheus)" in text
        assert "f(0.100) live 0.5" in text and "profile 0.10" in text and "DRIFT" in text
    assert "ProfileDrift" in cluster


def test_operator_settings_carry_the_live_window_and_drift_rule() -> None:
    from diffcascade_operator.kube.reconcile import live_settings
    from diffcascade_operator.kube.settings import OperatorSettings

    env = {"DIFFCASCADE_LIVE_WINDOW_SECONDS": "20", "DIFFCASCADE_DRIFT_DISTANCE": "0.25"}
    chosen = live_settings(OperatorSettings.from_env(env))
    assert (chosen.window_s, chosen.drift_distance, chosen.min_samples) == (20.0, 0.25, 30)
    assert live_settings(OperatorSettings(live_window_s=0.0)) == LiveProfileSettings()


def test_confidences_crowded_into_the_first_bucket_keep_the_profiles_resolution() -> None:
    """HADIS's discriminator puts 90 % of its confidences below 0.005, the first bucket's
    bound: inside that bucket the live curve follows the profile's shape, so a planned share
    turns into the threshold that realises it, not the linear guess through the bucket."""
    from diffcascade_operator.profiles import quantile_grid, threshold_for_share

    rng = random.Random(3)
    confidences = [rng.random() ** 6 * 0.006 for _ in range(4000)]
    profile = defer_curve_from_scores(confidences, thresholds=quantile_grid(confidences))
    histogram = confidence_histogram(confidences)
    points = tuple(sorted(set(THRESHOLD_GRID) | set(profile.thresholds)))
    shaped = defer_curve_from_histogram(histogram, thresholds=points, shape=profile)
    linear = defer_curve_from_histogram(histogram)
    ordered = sorted(confidences)
    for share in (0.2, 0.5, 0.8):
        t = threshold_for_share(shaped, share)
        realised = sum(1 for c in ordered if c < t) / len(ordered)
        assert realised == pytest.approx(share, abs=0.01)
    guess = threshold_for_share(linear, 0.2)
    assert sum(1 for c in ordered if c < guess) / len(ordered) > 0.4  # what linear gave
    # blending keeps the profile's points
    blended = blend_curves(profile, shaped, 0.5)
    assert set(profile.thresholds) <= set(blended.thresholds)
