"""Trace files: the DiffServe `<arrival_ms>,<prompt_idx>` format, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffcascade_operator.sim.traces import TraceError, load_trace, parse_trace


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
