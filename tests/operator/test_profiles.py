"""Profile loaders: bundled reference data, the worker's calibration file, specs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from diffcascade_operator.profiles import (
    THRESHOLD_GRID,
    DeferCurve,
    ProfileError,
    batch_latency_ms,
    candidate_batches,
    confidences_from_disc_scores,
    defer_curve_from_scores,
    defer_fraction,
    fid_at,
    load_defer_curve_file,
    load_latency_csv,
    profiles_from_spec,
    quantile_grid,
    reference_confidences,
    reference_defer_curve,
    reference_latency,
    reference_quality,
)
from diffcascade_operator.spec import parse_spec


def spec_dict(**light_gate: Any) -> dict[str, Any]:
    return {
        "sloSeconds": 5,
        "gpuBudget": 16,
        "simulatorOnly": True,  # reference curves, no gate runs
        "variants": [
            {
                "name": "sd-turbo",
                "model": "stabilityai/sd-turbo",
                "profile": {"batchLatencyMs": {"1": 100, "2": 150, "4": 220, "8": 410}},
                "maxBatchSize": 4,
                "gate": {"deferCurve": light_gate or {"reference": "sd-turbo"}},
            },
            {
                "name": "sd-v1-5",
                "model": "runwayml/stable-diffusion-v1-5",
                "profile": {"batchLatencyMs": {"4": 3680}},
                "maxBatchSize": 2,
                "gpusPerReplica": 2,
            },
        ],
        "quality": {"reference": "c1"},
    }


# --- reference data ----------------------------------------------------------------------------


def test_reference_sd_turbo_curve_matches_the_papers_deferral_fractions() -> None:
    curve = reference_defer_curve("sd-turbo")
    # the grid, plus every half-percent quantile of the confidences (exact there too)
    assert set(THRESHOLD_GRID) <= set(curve.thresholds) and len(curve.on_grid().fractions) == 201
    assert defer_fraction(curve, 0.1) == pytest.approx(0.449, abs=5e-4)
    assert defer_fraction(curve, 0.02) == pytest.approx(0.26, abs=5e-4)
    assert defer_fraction(curve, 0.5) == pytest.approx(0.993, abs=5e-4)
    assert defer_fraction(curve, 0.0) == 0.0 and defer_fraction(curve, 1.0) == 1.0


def test_reference_sdxs_curve_and_the_sdxl_lightning_alias() -> None:
    sdxs = reference_defer_curve("sdxs")
    assert defer_fraction(sdxs, 0.1) == pytest.approx(0.321, abs=5e-4)
    assert reference_defer_curve("sdxl-lightning") == sdxs


def test_reference_confidences_are_per_prompt_and_rebuild_the_curve() -> None:
    confidences = reference_confidences("sd-turbo")
    assert len(confidences) == 5000
    assert all(0.0 <= c <= 1.0 for c in confidences)
    curve = reference_defer_curve("sd-turbo")
    assert defer_curve_from_scores(confidences, thresholds=quantile_grid(confidences)) == curve
    assert defer_curve_from_scores(confidences) == curve.on_grid()


def test_reference_quality_and_latency_tables() -> None:
    c1 = reference_quality("c1")
    assert min(c1.fids) == 16.79 and c1.fids[0] == 18.55 and c1.fids[-1] == 22.77
    assert reference_quality("c3").fids[1] == 23.14
    assert reference_latency("sd-v1.5")[4] == 3680.0
    assert 32 not in reference_latency("sdxl")  # out of memory in the profile
    assert set(load_latency_csv()) == {"sd-turbo", "sdxs", "sd-v1.5", "sdxl-lightning", "sdxl"}


def test_unknown_reference_names_raise_a_profile_error_listing_known_ones() -> None:
    with pytest.raises(ProfileError, match="sd-turbo"):
        reference_defer_curve("sd-xyz")
    with pytest.raises(ProfileError, match="c1"):
        reference_quality("c9")
    with pytest.raises(ProfileError, match="sdxl"):
        reference_latency("dall-e")


# --- builders and interpolation ----------------------------------------------------------------


def test_confidence_is_one_minus_the_mean_of_a_prompts_four_scores() -> None:
    confidences = confidences_from_disc_scores([0.9, 0.9, 0.8, 0.8, 0.0, 0.2, 0.2, 0.0])
    assert confidences == pytest.approx((0.15, 0.9))
    with pytest.raises(ProfileError):
        confidences_from_disc_scores([0.1, 0.2, 0.3])


def test_defer_curve_counts_prompts_strictly_below_the_threshold() -> None:
    curve = defer_curve_from_scores([0.1, 0.2, 0.2, 0.9], thresholds=(0.0, 0.2, 0.5, 1.0))
    assert curve.fractions == (0.0, 0.25, 0.75, 1.0)


def test_interpolation_is_piecewise_linear_and_exact_on_points() -> None:
    curve = DeferCurve((0.0, 0.5, 1.0), (0.0, 0.8, 1.0))
    assert defer_fraction(curve, 0.25) == pytest.approx(0.4)
    assert defer_fraction(curve, 0.5) == 0.8
    c1 = reference_quality("c1")
    assert fid_at(c1, 0.4) == 16.79
    assert fid_at(c1, 0.45) == pytest.approx((16.79 + 16.95) / 2)
    assert fid_at(c1, 1.5) == 22.77


def test_batch_latency_for_sizes_not_profiled() -> None:
    table = {2: 150.0, 4: 220.0, 8: 410.0}
    assert batch_latency_ms(table, 4) == 220.0
    assert batch_latency_ms(table, 6) == pytest.approx(315.0)
    assert batch_latency_ms(table, 1) == 150.0  # a smaller batch is not slower
    assert batch_latency_ms(table, 16) == pytest.approx(820.0)  # largest per-image cost
    assert candidate_batches(table, 4) == {2: 150.0, 4: 220.0}
    assert candidate_batches(table, 1) == {1: 150.0}


# --- the worker's calibration file -------------------------------------------------------------


def test_calibration_json_loader_reads_thresholds_and_fractions(tmp_path: Path) -> None:
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"thresholds": [0.0, 0.5, 1.0], "deferFractions": [0, 0.6, 1]}))
    curve = load_defer_curve_file(path)
    assert curve.thresholds == (0.0, 0.5, 1.0) and curve.fractions == (0.0, 0.6, 1.0)


def test_calibration_json_confidences_rebuild_the_curve_on_the_allocator_grid(
    tmp_path: Path,
) -> None:
    path = tmp_path / "curve.json"
    doc = {"thresholds": [0, 1], "deferFractions": [0, 1], "confidences": [0.1, 0.3, 0.7, 0.9]}
    path.write_text(json.dumps(doc))
    curve = load_defer_curve_file(path)
    assert curve.thresholds == THRESHOLD_GRID
    assert defer_fraction(curve, 0.5) == 0.5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "cannot read"),
        ("[1, 2]", "JSON object"),
        ('{"thresholds": [0, 1]}', "deferFractions"),
        ('{"thresholds": [0, 1], "deferFractions": [0.5, 0.1]}', "non-decreasing"),
        ('{"thresholds": [0, 2], "deferFractions": [0, 1]}', r"\[0, 1\]"),
    ],
)
def test_bad_calibration_files_raise_a_clear_profile_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "curve.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message):
        load_defer_curve_file(path)


def test_missing_calibration_file_raises_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_defer_curve_file(tmp_path / "absent.json")


# --- from a spec -------------------------------------------------------------------------------


def test_profiles_from_spec_with_a_reference_curve_and_batch_cap() -> None:
    profiles = profiles_from_spec(parse_spec(spec_dict()))
    light, heavy = profiles.variants
    assert dict(light.batch_latency_ms) == {1: 100.0, 2: 150.0, 4: 220.0}  # maxBatchSize 4
    assert dict(heavy.batch_latency_ms) == {2: 3680.0}  # nothing profiled fits: the cap alone
    assert heavy.gpus_per_replica == 2 and heavy.defer_curve is None
    assert light.defer_curve == reference_defer_curve("sd-turbo")
    assert profiles.quality == reference_quality("c1")


def test_profiles_from_spec_with_an_inline_curve() -> None:
    spec = parse_spec(spec_dict(thresholds=[0.0, 0.2, 1.0], deferFractions=[0.0, 0.5, 1.0]))
    curve = profiles_from_spec(spec).variants[0].defer_curve
    assert curve is not None and defer_fraction(curve, 0.1) == pytest.approx(0.25)


def test_profiles_from_spec_resolves_a_relative_curve_path_against_base_dir(
    tmp_path: Path,
) -> None:
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "curve.json").write_text(
        json.dumps({"thresholds": [0.0, 1.0], "deferFractions": [0.0, 1.0]})
    )
    spec = parse_spec(spec_dict(path="gate/curve.json"))
    curve = profiles_from_spec(spec, base_dir=tmp_path).variants[0].defer_curve
    assert curve is not None and defer_fraction(curve, 0.3) == pytest.approx(0.3)
    with pytest.raises(ProfileError):
        profiles_from_spec(spec, base_dir=tmp_path / "elsewhere")


def test_profiles_from_spec_with_inline_quality_points() -> None:
    raw = spec_dict()
    raw["quality"] = {
        "fidByLightShare": [{"lightShare": 1, "fid": 20}, {"lightShare": 0, "fid": 18}]
    }
    quality = profiles_from_spec(parse_spec(raw)).quality
    assert quality is not None
    assert quality.light_shares == (0.0, 1.0) and fid_at(quality, 0.5) == pytest.approx(19.0)


def test_threshold_one_defers_even_fully_confident_prompts() -> None:
    curve = defer_curve_from_scores([0.2, 1.0, 1.0])
    assert curve.fractions[-1] == 1.0
    assert curve.fractions[-2] == pytest.approx(1 / 3)
