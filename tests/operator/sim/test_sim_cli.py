"""`diffcascade simulate` end to end through click, for every policy."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from diffcascade_operator.cli import main
from diffcascade_operator.sim.locate import bundled_dir
from diffcascade_operator.sim.policies import HADIS_ONLY, POLICIES

REQUIRED_KEYS = {
    "slo_violation_ratio",
    "mean_fid",
    "p50_latency_s",
    "p99_latency_s",
    "light_share",
    "gpu_seconds",
    "solve_ms_p50",
    "solve_ms_p95",
    "requests",
    "dropped",
    "late",
    "degraded",
    "deferred",
    "wall_s",
}


@pytest.fixture(scope="module")
def short_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 s of Poisson arrivals at 3 qps (about 120 requests), prompts 1..4999."""
    rng = random.Random(7)
    lines, t = [], 0.0
    while True:
        t += rng.expovariate(3.0)
        if t >= 40.0:
            break
        lines.append(f"{t * 1000:.1f},{rng.randrange(1, 5000)}")
    path = tmp_path_factory.mktemp("trace") / "short.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def simulate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["simulate", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in HADIS_ONLY])
def test_every_policy_runs_a_short_trace_and_prints_the_json_summary(
    policy: str, short_trace: Path, tmp_path: Path
) -> None:
    code, out = simulate(
        "--scenario",
        "sdturbo-sdv15",
        "--trace",
        str(short_trace),
        "--gpus",
        "4",
        "--policy",
        policy,
        "--slo-seconds",
        "5",
        "--json",
        "--no-png",
        "--out",
        str(tmp_path),
    )
    assert code == 0, out
    summary = json.loads(out)
    assert summary.keys() >= REQUIRED_KEYS
    assert summary["policy"] == policy
    assert summary["gpus"] == 4
    assert summary["requests"] == len(short_trace.read_text().splitlines())
    assert 0.0 <= summary["slo_violation_ratio"] <= 1.0
    assert 16.0 < summary["mean_fid"] < 23.0
    assert (tmp_path / "timeline.csv").is_file()


def test_policies_differ_where_the_paper_says_they_do(short_trace: Path, tmp_path: Path) -> None:
    shares = {}
    for policy in ("clipper-light", "clipper-heavy"):
        code, out = simulate(
            "--scenario",
            "sdturbo-sdv15",
            "--trace",
            str(short_trace),
            "--gpus",
            "4",
            "--policy",
            policy,
            "--json",
            "--no-png",
            "--out",
            str(tmp_path / policy),
        )
        assert code == 0, out
        shares[policy] = json.loads(out)["light_share"]
    assert shares == {"clipper-light": 1.0, "clipper-heavy": 0.0}


def test_run_writes_a_per_second_csv_and_a_png_timeline(short_trace: Path, tmp_path: Path) -> None:
    code, out = simulate(
        "--scenario",
        "sdturbo-sdv15",
        "--trace",
        str(short_trace),
        "--gpus",
        "4",
        "--policy",
        "static",
        "--out",
        str(tmp_path),
    )
    assert code == 0, out
    assert "slo_violation_ratio" in out
    with (tmp_path / "timeline.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 40
    assert {"arrivals", "late", "dropped", "threshold", "replicas_sd-turbo", "queue_sd-v1-5"} <= (
        rows[0].keys()
    )
    assert sum(int(r["arrivals"]) for r in rows) == len(short_trace.read_text().splitlines())
    png = (tmp_path / "timeline.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert json.loads((tmp_path / "summary.json").read_text())["policy"] == "static"


def test_scenario_file_path_and_overrides_are_used(short_trace: Path, tmp_path: Path) -> None:
    folder = bundled_dir("scenarios")
    assert folder is not None
    copy = tmp_path / "mine.yaml"
    shutil.copy(folder / "sdxs-sdv15.yaml", copy)
    code, out = simulate(
        "--scenario",
        str(copy),
        "--trace",
        str(short_trace),
        "--gpus",
        "6",
        "--slo-seconds",
        "7",
        "--policy",
        "diffcascade",
        "--startup-seconds",
        "3",
        "--dispatch",
        "round-robin",
        "--scrape-interval",
        "2",
        "--json",
        "--no-png",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, out
    summary = json.loads(out)
    assert (summary["scenario"], summary["gpus"], summary["slo_seconds"]) == ("sdxs-sdv15", 6, 7.0)
    assert (summary["startup_seconds"], summary["dispatch"]) == (3.0, "round-robin")
    assert summary["scrape_interval_s"] == 2.0
    assert summary["served"] + summary["dropped"] == summary["requests"]


def test_missing_trace_file_is_a_usage_error(tmp_path: Path) -> None:
    code, out = simulate(
        "--scenario",
        "sdturbo-sdv15",
        "--trace",
        str(tmp_path / "none.txt"),
        "--json",
    )
    assert code == 2
    assert "--trace" in out and "neither a file nor a bundled trace" in out
    assert "Traceback" not in out


def test_malformed_trace_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("0,1\n10,x\n")
    code, out = simulate("--scenario", "sdturbo-sdv15", "--trace", str(bad))
    assert code == 2
    assert "line 2" in out


def test_a_prompt_index_beyond_any_integer_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("0,1\n10,inf\n")
    code, out = simulate("--scenario", "sdturbo-sdv15", "--trace", str(bad))
    assert code == 2
    assert "line 2: prompt_idx must be a whole number >= 0" in out
    assert "Traceback" not in out and "OverflowError" not in out


def test_a_trace_spanning_years_runs_in_the_time_of_its_requests(tmp_path: Path) -> None:
    """Two requests 1e10 ms apart used to take ~2.5 h and 19 GB (a tick, a scrape and a row for
    every second in between); idle time past the horizon is now left out of the replay."""
    trace = tmp_path / "span.txt"
    trace.write_text("0,1\n10000000000,2\n")
    code, out = simulate(
        "--scenario",
        "sdturbo-sdv15",
        "--trace",
        str(trace),
        "--gpus",
        "16",
        "--no-png",
        "--json",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["requests"] == 2 and summary["dropped"] == 0
    assert summary["idle_skipped_s"] > 9_999_000
    assert summary["decisions"] < 400  # one tick per interval of the replayed time only


def test_unknown_scenario_is_a_usage_error(short_trace: Path) -> None:
    code, out = simulate("--scenario", "nope", "--trace", str(short_trace))
    assert code == 2
    assert "sdturbo-sdv15" in out  # lists the bundled ones


def test_invalid_scenario_manifest_names_the_problem(short_trace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: DiffusionCascade\nmetadata: {name: x}\nspec: {sloSeconds: 5}\n")
    code, out = simulate("--scenario", str(bad), "--trace", str(short_trace))
    assert code == 2
    assert "gpuBudget" in out
    bad.write_text("- not a mapping\n")
    code, out = simulate("--scenario", str(bad), "--trace", str(short_trace))
    assert code == 2 and "mapping" in out


def test_static_policy_rejects_a_cascade_it_has_no_constants_for(
    short_trace: Path, tmp_path: Path
) -> None:
    folder = bundled_dir("scenarios")
    assert folder is not None
    text = (folder / "sdturbo-sdv15.yaml").read_text()
    text = text.replace(
        "deferCurve: {reference: sd-turbo}",
        ("deferCurve: {thresholds: [0, 1], deferFractions: [0, 1]}"),
    ).replace(
        "quality: {reference: c1}",
        ("quality: {fidByLightShare: [{lightShare: 0, fid: 18}, {lightShare: 1, fid: 22}]}"),
    )
    custom = tmp_path / "custom.yaml"
    custom.write_text(text)
    code, out = simulate(
        "--scenario",
        str(custom),
        "--trace",
        str(short_trace),
        "--policy",
        "static",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 1
    assert "static policy" in out


@pytest.mark.parametrize(
    "policy",
    [
        "hadis",
        "hadis-diffserve",
        "clipper-light",
        "clipper-heavy",
        "infaas-acc",
        "proteus",
        "oracle",
    ],
)
def test_every_policy_runs_hadis_benchmark_scored_both_ways(
    policy: str, short_trace: Path, tmp_path: Path
) -> None:
    code, out = simulate(
        "--scenario",
        "hadis-sd35",
        "--trace",
        str(short_trace),
        "--policy",
        policy,
        "--scoring",
        "both",
        "--json",
        "--no-png",
        "--out",
        str(tmp_path),
    )
    assert code == 0, out
    summary = json.loads(out)
    assert summary["scoring"] == "project"
    assert summary["hadis"]["scoring"] == "hadis"
    assert 19.0 < summary["hadis"]["avg_fid"] < 30.0
    assert summary["dispatch"] == "random"


def test_hadis_only_policies_and_scoring_need_a_quality_table(
    short_trace: Path, tmp_path: Path
) -> None:
    args = ["--scenario", "sdturbo-sdv15", "--trace", str(short_trace), "--no-png"]
    code, out = simulate(*args, "--policy", "hadis", "--out", str(tmp_path))
    assert code != 0 and "quality table" in out
    code, out = simulate(*args, "--scoring", "hadis", "--out", str(tmp_path))
    assert code != 0 and "qualityTable" in out
