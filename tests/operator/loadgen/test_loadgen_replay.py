"""A replay stopped early (the demo's Ctrl-C) still writes a report of what it sent."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from diffcascade_operator.loadgen.replay import replay
from diffcascade_operator.loadgen.schedule import poisson_schedule
from diffcascade_operator.local.supervisor import Worker
from rich.console import Console

pytestmark = pytest.mark.slow


async def test_a_stopped_replay_writes_a_partial_report_listing_its_files(
    light_worker: Worker, tmp_path: Path
) -> None:
    schedule = poisson_schedule(qps=2.0, duration_s=60.0, seed=1)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(2.0, stop.set)
    report_path = tmp_path / "report.json"
    outcome = await asyncio.wait_for(
        replay(
            url=light_worker.url,
            schedule=schedule,
            prompts=["a cat", "a dog"],
            slo_seconds=10.0,
            timeout_s=30.0,
            max_inflight=8,
            report_path=report_path,
            console=Console(quiet=True),
            stop=stop,
        ),
        timeout=30.0,  # well before the 60 s schedule would end
    )
    doc = json.loads(report_path.read_text())
    assert doc["interrupted"] is True and outcome.report["interrupted"] is True
    assert 0 < doc["total"] < len(schedule.arrivals)  # only what was sent
    assert doc["wall_s"] < 20.0
    assert set(doc["files"]) == {
        "report.json",
        "report-requests.csv",
        "latency.png",
        "deferral.png",
    }
    assert all((tmp_path / name).is_file() for name in doc["files"])
