"""Arrival schedules and the report's arithmetic, on synthetic records."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffcascade_operator.loadgen.client import LoadResult, RequestRecord
from diffcascade_operator.loadgen.prompts import PromptsError, load_prompts
from diffcascade_operator.loadgen.report import percentile, summarize
from diffcascade_operator.loadgen.schedule import (
    Schedule,
    TraceError,
    poisson_schedule,
    trace_schedule,
)


def test_poisson_schedule_is_seeded_and_near_its_rate() -> None:
    a = poisson_schedule(qps=20, duration_s=30, seed=3)
    b = poisson_schedule(qps=20, duration_s=30, seed=3)
    assert a == b
    assert 480 <= len(a.arrivals) <= 720
    times = [x.at_s for x in a.arrivals]
    assert times == sorted(times) and times[-1] < 30


def test_trace_schedule_keeps_order_and_cuts_at_duration(tmp_path: Path) -> None:
    trace = tmp_path / "t.txt"
    trace.write_text("# comment\n2500,7\n500,3\n1500,5\n")
    full = trace_schedule(str(trace))
    assert [(a.at_s, a.prompt_index) for a in full.arrivals] == [(0.5, 3), (1.5, 5), (2.5, 7)]
    cut = trace_schedule(str(trace), duration_s=2.0)
    assert [a.prompt_index for a in cut.arrivals] == [3, 5]
    fast = trace_schedule(str(trace), speed=2.0)
    assert fast.arrivals[-1].at_s == pytest.approx(1.25)


def test_a_malformed_trace_names_the_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.txt"
    trace.write_text("100,1\nnot-a-line\n")
    with pytest.raises(TraceError, match="line 2"):
        trace_schedule(str(trace))


def test_bundled_prompts_are_real_diffusiondb_lines() -> None:
    prompts = load_prompts()
    assert len(prompts) == 1000
    assert all(p.strip() for p in prompts)


def test_an_empty_prompts_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "p.txt"
    empty.write_text("\n  \n")
    with pytest.raises(PromptsError, match="no prompts"):
        load_prompts(empty)


def _rec(i: int, latency: float, **kw: object) -> RequestRecord:
    fields: dict[str, object] = {
        "index": i,
        "prompt_index": i,
        "scheduled_s": float(i),
        "latency_s": latency,
        "status": 200,
        "error": None,
    }
    fields.update(kw)
    return RequestRecord(**fields)  # type: ignore[arg-type]


def test_report_counts_late_and_failed_requests_as_slo_violations() -> None:
    records = (
        _rec(0, 0.5, served_by="light"),
        _rec(1, 1.0, served_by="heavy", deferred=True),
        _rec(2, 4.0, served_by="light", deferred=True, degraded=True),  # late, light image
        _rec(3, 0.2, status=503, error="http_503"),
        _rec(4, 10.0, status=None, error="timeout"),
        _rec(5, 0.3, served_by="light"),
    )
    schedule = Schedule(name="s", arrivals=())
    report = summarize(
        LoadResult(url="http://x", schedule=schedule, records=records, started_at=0, wall_s=6),
        slo_seconds=3.0,
    )
    assert report["total"] == 6
    assert report["succeeded"] == 4
    assert report["late"] == 1
    assert report["errors"] == {"http_503": 1, "timeout": 1}
    assert report["slo_violation_ratio"] == pytest.approx(3 / 6, abs=1e-4)
    assert report["light_share"] == pytest.approx(3 / 4)  # the degraded one is a light image
    assert report["deferred"] == 2
    assert report["degraded"] == 1
    assert report["served_by"] == {"heavy": 1, "light": 3}
    assert report["latency_s"]["p50"] == pytest.approx(0.75)
    assert report["latency_s"]["max"] == pytest.approx(4.0)


@pytest.mark.parametrize(("interrupted", "ratio", "total"), [(True, 0.0, 2), (False, 0.5, 4)])
def test_requests_cancelled_by_ctrl_c_are_no_slo_violations(
    interrupted: bool, ratio: float, total: int
) -> None:
    records = (
        _rec(0, 0.5, served_by="light"),
        _rec(1, 0.6, served_by="light"),
        _rec(2, 1.0, status=None, error="cancelled"),
        _rec(3, 1.2, status=None, error="cancelled"),
    )
    result = LoadResult(
        url="http://x",
        schedule=Schedule(name="s", arrivals=()),
        records=records,
        started_at=0,
        wall_s=3,
        interrupted=interrupted,
    )
    report = summarize(result, slo_seconds=3.0)
    assert report["slo_violation_ratio"] == ratio and report["total"] == total
    assert report["cancelled"] == (2 if interrupted else 0)


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
