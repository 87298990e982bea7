"""HADIS's reference data: the quality tables, the pair curves, the per-prompt files and the
rules that turn shares into cuts (the artifact's percentile rules)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest
from diffcascade_operator.profiles import (
    ProfileError,
    profiles_from_spec,
    reference_confidences,
    reference_quality_table,
    reference_router_scores,
)
from diffcascade_operator.sim.routing import escalation_cut, router_cut
from diffcascade_operator.sim.scenarios import ScenarioError, load_scenario, sim_rules
from diffcascade_operator.sim.traces import load_trace
from diffcascade_operator.spec import InvalidSpec, parse_spec

REPO = Path(__file__).resolve().parents[3]
BENCH = REPO / "bench"
HYBRID = reference_quality_table("hadis-hybrid")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hadis_reference", BENCH / "hadis_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_hybrid_table_is_hadis_49_rows_over_three_adjacent_pairs() -> None:
    assert len(HYBRID.rows) == 49
    counts = {pair: sum(1 for r in HYBRID.rows if r.pair == pair) for pair in HYBRID.pairs()}
    assert counts == {
        ("sd35-medium", "sd35-large"): 6,
        ("sd35-large-turbo", "sd35-medium"): 31,
        ("sdxl-lightning", "sd35-large-turbo"): 12,
    }
    best = HYBRID.row(("sd35-medium", "sd35-large"), 0.2, 0.5)
    assert (best.heavy_share, best.fid) == (0.6, 19.29)
    assert HYBRID.worst().fid == 29.75
    # the table's h is the independence formula r + c - rc, to its two decimals
    for row in HYBRID.rows:
        r, c = row.router_share, row.escalate_share
        assert row.heavy_share == pytest.approx(r + c - r * c, abs=0.011)


@pytest.mark.parametrize(
    ("name", "rows"),
    [("hadis-fixed13", 121), ("hadis-disc-only", 25), ("hadis-router-only", 24)],
)
def test_the_ablation_tables_are_bundled(name: str, rows: int) -> None:
    assert len(reference_quality_table(name).rows) == rows


def test_pair_curves_and_single_fids_are_parse_logs_constants() -> None:
    assert HYBRID.single == {
        "sdxl-lightning": 29.76,
        "sd35-large-turbo": 25.23,
        "sd35-medium": 20.61,
        "sd35-large": 19.95,
    }
    assert len(HYBRID.pair_curves) == 6
    assert HYBRID.curve_fid(("sd35-medium", "sd35-large"), 0.5) == 19.42
    assert HYBRID.curve_fid(("sdxl-lightning", "sd35-large-turbo"), 0.8) == 25.02


def test_served_fid_credits_a_row_only_at_its_shares() -> None:
    pair = ("sd35-medium", "sd35-large")
    assert HYBRID.served_fid(pair, 0.21, 0.48) == 19.29  # rounds to the row r=.2 c=.5
    # no row at r=0 for this pair: the discriminator-only curve at h = c
    assert HYBRID.served_fid(pair, 0.0, 0.5) == 19.42
    assert HYBRID.served_fid(("sd35-large", "sd35-large"), 0.0, 0.0) == 19.95


def test_per_prompt_files_cover_the_5000_prompts() -> None:
    assert len(reference_router_scores("hadis-rule")) == 5000
    for name in ("sdxl-lightning", "sd35-large-turbo", "sd35-medium", "sd35-large"):
        assert len(reference_confidences(f"hadis-{name}")) == 5000


def test_router_scores_are_z_scored_features_times_hadis_weights() -> None:
    script = _script()
    features = [[1.0] * 8, [3.0] * 8, [2.0] * 8]
    # sample std of (1, 3, 2) is 1, so the z-scores are -1, 1, 0
    weight = sum(script.ROUTER_WEIGHTS)
    assert script.router_scores(features) == pytest.approx([-weight, weight, 0.0])
    assert script.confidences([0.1, 0.2, 0.3, 0.4, 1.0, 1.0, 1.0, 1.0]) == pytest.approx(
        [0.25, 1.0]
    )


def test_the_bundled_e1_trace_is_the_artifacts_file() -> None:
    path = REPO / "bench" / "traces" / "hadis_e1_64qps.txt"
    assert path.stat().st_size == 167_651  # trace_64qps.txt as the artifact ships it
    assert path.read_text().startswith("543.0,1724\n602.0,2112\n")
    bundled = load_trace("hadis_e1_64qps")
    assert len(bundled) == 12_270
    assert bundled.duration_s == pytest.approx(347.0, abs=1.0)


def test_the_bundled_prompts_and_features_are_the_artifacts_and_give_its_router_scores() -> None:
    import csv

    script = _script()
    reference = REPO / "operator" / "diffcascade_operator" / "reference"
    prompts = (reference / "hadis_prompts.txt").read_text(encoding="utf-8").splitlines()
    with (reference / "hadis_prompt_features.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    assert len(prompts) == len(rows) == 5000
    # the features file names its prompt on every row (3 lose a non-ASCII character there)
    assert sum(p != row[0] for p, row in zip(prompts, rows, strict=True)) == 3
    features = [[float(v) for v in row[1:]] for row in rows]
    assert reference_router_scores("hadis-rule") == pytest.approx(script.router_scores(features))


def test_router_share_is_a_percentile_with_hadis_index_rule() -> None:
    scores = [float(v) for v in range(10)]
    assert router_cut(scores, 0.2) == 7.0  # sorted[int(10 * 0.8) - 1]: 7, 8, 9 are hard
    assert router_cut(scores, 0.0) == 9.0  # r = 0 still routes the top prompt
    assert escalation_cut(scores, 0.5) == 4.0  # confidences below 4 escalate: 0..3
    assert escalation_cut(scores, 0.0) == 0.0  # c = 0 escalates nothing


def test_a_quality_table_must_name_variants_of_the_cascade() -> None:
    raw = load_scenario("hadis-sd35").spec.model_dump(by_alias=True, exclude_none=True)
    raw["qualityTable"] = {
        "rows": [
            {
                "light": "sd35-large",
                "heavy": "nope",
                "routerShare": 0,
                "escalateShare": 0,
                "fid": 20,
            }
        ]
    }
    # inline rows: the spec refuses them (same words in the CRD's CEL rule)
    with pytest.raises(InvalidSpec, match=r"must name variants of spec\.variants"):
        parse_spec(raw)
    raw["qualityTable"]["reference"] = "hadis-hybrid"
    with pytest.raises(InvalidSpec, match="either rows or reference"):
        parse_spec(raw)
    # a bundled table is read when profiles load: its rows must fit the cascade's names
    raw["qualityTable"] = {"reference": "hadis-hybrid"}
    raw["variants"][-1]["name"] = "sd35-xl"
    with pytest.raises(ProfileError, match="not in the cascade: sd35-large"):
        profiles_from_spec(parse_spec(raw))


def test_the_scenario_states_hadis_worker_rules() -> None:
    scenario = load_scenario("hadis-sd35")
    assert scenario.rules.dispatch == "random"
    assert scenario.rules.admission_slo_factor == 1.5
    assert scenario.rules.drop_after_slo_factor == 2.0
    assert scenario.spec.gpu_budget == 16 and scenario.spec.slo_seconds == 6
    with pytest.raises(ScenarioError, match="unknown annotation"):
        sim_rules({"sim.diffcascade.dev/nope": "1"})
    assert math.isclose(sim_rules({}).admission_slo_factor, 1.0)


def test_the_reference_files_are_written_from_an_artifact_checkout_in_one_step(
    tmp_path: Path,
) -> None:
    script = _script()
    root = tmp_path / "HADIS" / "hadis"
    (root / "traces" / "maf" / "multi_dynamic_testbed").mkdir(parents=True)
    (root / "traces" / "maf" / "multi_dynamic_testbed" / "trace_64qps.txt").write_text(
        "543.0,1724\n5892.0,2937\n5215.0,19\n"
    )
    (root / "router").mkdir()
    header = "prompt,prompt_length,token_rarity,num_objects,abstractness,attribute_density,"
    header += "spatial_relations,action_verbs,named_entities\n"
    (root / "router" / "prompt_features.csv").write_text(
        header + '"a cat, on a mat",1,1,1,1,1,1,1,1\nb,3,3,3,3,3,3,3,3\nc,2,2,2,2,2,2,2,2\n'
    )
    scores = root / "discriminator" / "confidence_scores"
    scores.mkdir(parents=True)
    for k in range(4):
        rows = [f"{1 - v:.18e} {v:.18e}" for v in (0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5)]
        (scores / f"scores_model_{k}.txt").write_text("\n".join(rows) + "\n")
    script.from_artifact(tmp_path / "HADIS", reference=tmp_path, traces=tmp_path)
    weight = sum(script.ROUTER_WEIGHTS)
    routed = [float(v) for v in (tmp_path / "router_hadis-rule.txt").read_text().split()]
    assert routed == pytest.approx([-weight, weight, 0.0])
    confidence = (tmp_path / "confidence_hadis-sd35-medium.txt").read_text().split()
    assert [float(v) for v in confidence] == pytest.approx([0.25, 0.5])
    assert (tmp_path / "hadis_e1_64qps.txt").read_text().startswith("543.0,1724\n5892.0")
    assert (tmp_path / "hadis_prompt_features.csv").read_text().startswith(header)


def test_a_bundled_gate_curve_turns_an_escalation_share_into_the_threshold_that_realises_it() -> (
    None
):
    from diffcascade_operator.profiles import (
        reference_confidences,
        reference_defer_curve,
        threshold_for_share,
    )

    for variant in ("sdxl-lightning", "sd35-large-turbo", "sd35-medium"):
        name = f"hadis-{variant}"
        ordered = sorted(reference_confidences(name))
        curve = reference_defer_curve(name)
        for share in (0.1, 0.2, 0.5, 0.6):
            t = threshold_for_share(curve, share)
            realised = sum(1 for c in ordered if c < t) / len(ordered)
            assert realised == pytest.approx(share, abs=0.005), (name, share)
