"""Trace files: the DiffServe `<arrival_ms>,<prompt_idx>` format, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffcascade_operator.profiles import profiles_from_spec
from diffcascade_operator.sim import run
from diffcascade_operator.sim.engine import EngineConfig
from diffcascade_operator.sim.scenarios import load_scenario
from diffcascade_operator.sim.traces import (
    Trace,
    TraceError,
    compress_idle,
    load_trace,
    parse_trace,
)


def test_trace_lines_become_sorted_arrivals_in_seconds() -> None:
    trace = parse_trace("636.0,4817\n# comment\n\n100,2\n1058.0,2143\n", name="t")
    assert trace.arrivals_s == (0.1, 0.636, 1.058)
    assert trace.prompts == (2, 4817, 2143)
    assert len(trace) == 3


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("1,2\n3\n", "line 2"),
        ("1,2\nabc,4\n", "line 2"),
        ("1,2\n5,6\n-3,4\n", "line 3"),
        ("1,2,3\n", "line 1"),
        ("1,-2\n", "line 1"),
        ("nan,1\n", "line 1"),
        ("0,1\n5,inf\n", "line 2"),  # used to escape as an OverflowError traceback
        ("0,1\n5,1e400\n", "line 2"),
        ("0,1\n5,nan\n", "line 2"),
    ],
)
def test_bad_trace_line_is_reported_with_its_line_number(text: str, where: str) -> None:
    with pytest.raises(TraceError, match=f"bad.txt {where}"):
        parse_trace(text, name="bad.txt")


def test_empty_trace_is_rejected() -> None:
    with pytest.raises(TraceError, match="no requests"):
        parse_trace("# nothing\n", name="empty")


def test_bundled_trace_loads_by_name_and_matches_the_reference_counts() -> None:
    trace = load_trace("maf_1to8qps")
    assert len(trace) == 1633
    assert 346.0 < trace.duration_s < 347.0
    assert all(b >= a for a, b in zip(trace.arrivals_s, trace.arrivals_s[1:], strict=False))


def test_trace_loads_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("0,1\n500,2\n")
    assert load_trace(str(path)).name == "mine"


def test_unknown_trace_names_the_bundled_ones() -> None:
    with pytest.raises(TraceError, match="maf_1to8qps"):
        load_trace("no-such-trace")


def test_idle_stretches_beyond_the_horizon_are_shortened_to_it() -> None:
    trace = parse_trace("5000,1\n6000,2\n1006000,3\n1006500,4\n", name="t")
    replayed = compress_idle(trace, horizon_s=100.0)
    assert replayed.arrivals_s == (5.0, 6.0, 106.0, 106.5)
    assert replayed.prompts == trace.prompts
    assert replayed.idle_skipped_s == pytest.approx(900.0)
    assert compress_idle(trace, horizon_s=5000.0) is trace  # nothing to take out


def test_a_long_first_stretch_is_shortened_too() -> None:
    replayed = compress_idle(parse_trace("10000000000,1\n", name="t"), horizon_s=700.0)
    assert replayed.arrivals_s == (700.0,)
    assert replayed.idle_skipped_s == pytest.approx(1e7 - 700.0)


def test_leaving_out_idle_time_beyond_the_horizon_changes_no_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst, a stretch longer than the horizon without requests, a second burst: replayed
    in full and replayed shortened, every request fares the same."""
    scenario = load_scenario("sdturbo-sdv15", gpus=4)
    first = [i * 0.1 for i in range(60)]  # 10 qps for 6 s
    spec = scenario.spec
    stages = run.stage_models(spec, profiles_from_spec(spec, base_dir=scenario.base_dir))
    config = EngineConfig(slo_s=spec.slo_seconds, interval_s=spec.control.interval_seconds)
    horizon = run.idle_horizon_s(spec, config, stages)
    second = [first[-1] + horizon + 400.0 + i * 0.1 for i in range(60)]
    trace = Trace("burst-idle-burst", tuple(first + second), tuple(range(1, 121)))

    shortened = run.simulate(scenario=scenario, trace=trace, policy_name="diffcascade")
    monkeypatch.setattr(run, "compress_idle", lambda trace, horizon_s: trace)
    full = run.simulate(scenario=scenario, trace=trace, policy_name="diffcascade")

    assert shortened.idle_skipped_s == pytest.approx(400.0)
    assert full.idle_skipped_s == 0.0
    a, b = shortened.result, full.result
    assert a.served_by == b.served_by and a.deferred == b.deferred
    assert [f - t for f, t in zip(a.finish_s, a.arrival_s, strict=True)] == pytest.approx(
        [f - t for f, t in zip(b.finish_s, b.arrival_s, strict=True)]
    )
    assert len(a.decisions) < len(b.decisions)
