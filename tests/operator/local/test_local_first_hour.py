"""What a new user meets in the first hour: clear CLI errors, separate run folders, tiny models
built on demand, plan lines that fit a terminal, one exit code for Ctrl-C."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from diffcascade_operator.local import demo as demo_module
from diffcascade_operator.local.cli import claim_run_dir, status
from diffcascade_operator.local.runner import (
    EXIT_INTERRUPTED,
    Interrupted,
    load_cascade_file,
)
from diffcascade_operator.local.view import plan_line
from local_support import cascade_doc
from rich.console import Console


@pytest.mark.parametrize("args", [["--cluster"], ["--namespace", "images"]])
def test_status_of_a_cluster_without_a_name_is_a_usage_error(args: list[str]) -> None:
    result = CliRunner().invoke(status, args)
    assert result.exit_code == 2, result.output
    assert "NAME" in result.output and "Traceback" not in result.output


def test_two_runs_never_share_a_run_folder(tmp_path: Path) -> None:
    preferred = tmp_path / "runs" / "tiny"
    first, first_lock = claim_run_dir(preferred, explicit=False)
    second, second_lock = claim_run_dir(preferred, explicit=False)
    try:
        assert first == preferred and second == preferred.with_name("tiny-2")
        with pytest.raises(Exception, match="in use by another"):
            claim_run_dir(preferred, explicit=True)
    finally:
        first_lock.close()
        second_lock.close()
    again, lock = claim_run_dir(preferred, explicit=True)  # free again once the run ended
    lock.close()
    assert again == preferred


def test_up_builds_the_tiny_models_only_for_a_cascade_over_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[Path] = []
    monkeypatch.setattr(demo_module, "ensure_tiny_models", lambda base, _c: built.append(base))
    tiny = {"light": Path(".models/tiny-light"), "heavy": Path(".models/tiny-heavy")}
    other = {"light": tmp_path / "mine-light", "heavy": tmp_path / "mine-heavy"}
    for models in (tiny, other):
        doc = cascade_doc(models)
        doc["spec"]["variants"][0]["gate"]["discriminator"]["uri"] = str(
            models["light"] / "gate.pt"
        )
        path = tmp_path / "cascade.yaml"
        path.write_text(yaml.safe_dump(doc))
        _, spec = load_cascade_file(path)
        demo_module.build_missing_tiny_models(spec, base_dir=tmp_path, console=Console())
    assert built == [tmp_path]  # the tiny example: built; another missing model: left alone


def test_plan_line_labels_the_planned_demand_and_says_each_number_once() -> None:
    state = {
        "plan": {
            "demand_qps": 13.84,
            "threshold": 0.115,
            "defer_fraction": 0.47,
            "predicted_fid": 17.12,
            "reason": "demand 13.8 qps (↑ trend) → t=0.115 f=0.47 light x2 b4, heavy x3 b2, "
            "FID 17.1; solved optimal in 3 ms",
        },
        "metrics": {"demand_qps": 8.42},
        "replicas": {"light": {"ready": 2, "desired": 2}, "heavy": {"ready": 2, "desired": 3}},
    }
    line = plan_line(state)
    assert "planned 13.8 qps (measured 8.4)" in line
    assert len(line) <= 105 and line.endswith("optimal, 3 ms"), line
    numbers = re.findall(r"\d+\.\d+", line.split(" ", 1)[1])
    assert len(numbers) == len(set(numbers)), line  # nothing said twice
    state["plan"]["reason"] = "metrics unavailable; t=0.12 f=0.59 light x1 b1; initial plan"
    assert plan_line(state).endswith("FID 17.1; metrics unavailable; initial plan")


def test_a_hybrid_plan_names_its_pair_and_router_share_in_the_line_and_the_panel() -> None:
    from diffcascade_operator.local.view import render_state

    state = {
        "cascade": "c",
        "plan": {
            "demand_qps": 10.0,
            "threshold": 0.11,
            "defer_fraction": 0.46,
            "predicted_fid": 21.6,
            "entry_stage": "turbo",
            "router_share": 0.4,
            "row": {"router_share": 0.4, "escalate_share": 0.1, "fid": 21.6},
            "variants": [
                {"name": "lightning", "batch_size": 1},
                {"name": "turbo", "batch_size": 2, "next_stage": "medium"},
                {"name": "medium", "batch_size": 1},
            ],
            "reason": "demand 10.0 qps → turbo→medium r=0.4 t=0.11 f=0.46 turbo x2 b2, "
            "medium x14 b1, FID 21.6; solved optimal in 40 ms",
        },
        "metrics": {"demand_qps": 9.5},
        "replicas": {"turbo": {"ready": 2, "desired": 2}, "medium": {"ready": 14, "desired": 14}},
    }
    line = plan_line(state)
    assert "turbo -> medium, router share 0.40 (table row r=0.4 c=0.1: FID 21.6)" in line
    assert line.endswith("optimal, 40 ms"), line  # the reason's summary is not repeated
    console = Console(width=200, record=True)
    console.print(render_state(state))
    assert "turbo -> medium, router share 0.40" in console.export_text()


def test_a_signal_raises_interrupted_with_what_the_body_wound_down_to() -> None:
    """`up` and `demo` both turn this into exit code 130 (the runner's one rule)."""
    from diffcascade_operator.local import runner

    class FakeCascade:
        variants = ["light"]

        class supervisor:  # the attribute run_cascade reads
            log_dir = Path(".")

            @staticmethod
            def kill_all() -> None: ...

        async def start(self) -> None: ...

        async def wait_ready(self, _timeout: float) -> str:
            return "http://127.0.0.1:1"

        async def stop(self) -> None: ...

        def shutdown_now(self) -> None: ...

    async def main() -> object:
        stop = asyncio.Event()

        async def body(_url: str) -> str:
            await stop.wait()
            return "partial report"

        async def interrupt_soon() -> None:
            await asyncio.sleep(0.2)
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(interrupt_soon()))
        return await runner.run_cascade(
            FakeCascade(),  # type: ignore[arg-type]
            ready_timeout_s=5,
            on_ready=lambda _u: None,
            body=body,
            body_stop=stop,
        )

    with pytest.raises(Interrupted) as stopped:
        asyncio.run(main())
    assert stopped.value.result == "partial report"
    assert EXIT_INTERRUPTED == 130


async def test_load_takes_the_slo_from_a_local_run_and_defaults_elsewhere() -> None:
    from diffcascade_operator.loadgen.cli import DEFAULT_SLO_SECONDS, cascade_slo
    from diffcascade_operator.local.router import Router

    router = Router(variants=["light"], plan=lambda: {"slo_seconds": 7.5}, cascade="tiny")
    url = await router.start()
    try:
        slo, source = await asyncio.to_thread(cascade_slo, url)
    finally:
        await router.stop()
    assert (slo, source) == (7.5, "the cascade's")
    gone, why = await asyncio.to_thread(cascade_slo, url)  # nothing listens there now
    assert gone == DEFAULT_SLO_SECONDS and "default" in why
