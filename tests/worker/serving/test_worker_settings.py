"""Start-up settings: flags, environment, model-folder defaults, clear errors for bad flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from diffcascade_worker.models.engine import resolve_settings
from diffcascade_worker.serving.serve_command import read_token, serve
from diffcascade_worker.serving.settings import DEFAULT_SIZE, WorkerSettings


def test_unset_run_settings_come_from_the_model_folder_and_flags_win(
    tiny_models: dict[str, Path],
) -> None:
    light = resolve_settings(WorkerSettings(model=str(tiny_models["light"]), variant="light"))
    heavy = resolve_settings(
        WorkerSettings(model=str(tiny_models["heavy"]), variant="heavy", steps=3)
    )
    assert (light.steps, light.guidance, light.size) == (1, 0.0, 64)
    assert heavy.steps == 3 and heavy.guidance is not None and heavy.guidance > 1.0
    hub = resolve_settings(WorkerSettings(model="org/some-model", variant="v"))
    assert hub.size == DEFAULT_SIZE and hub.steps == 1


def test_initial_config_carries_the_cascade_flags() -> None:
    settings = WorkerSettings(
        model="m",
        variant="v",
        threshold=0.3,
        batch_size=4,
        next_stage_url="http://heavy:8000",
        slo_seconds=2.5,
    )
    config = settings.initial_config()
    assert (config.threshold, config.batch_size, config.slo_seconds) == (0.3, 4, 2.5)
    assert config.next_stage_url == "http://heavy:8000"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "/no/such/folder", "--variant", "v"], "no such folder"),
        (["--size", "60"], "--size: Value error, size must be a multiple of 8"),
        (["--threshold", "1.5"], "--threshold"),
        (["--batch-size", "0"], "--batch-size"),
        (["--next-stage-url", "heavy:8000"], "--next-stage-url"),
        (["--forward-timeout", "0"], "--forward-timeout"),
        (["--gate", "/no/such/gate.pt"], "--gate"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_flags_are_usage_errors_not_tracebacks(
    tiny_models: dict[str, Path], args: list[str], fragment: str
) -> None:
    base = ["--model", str(tiny_models["light"]), "--variant", "light"]
    result = CliRunner().invoke(serve, base + args if args[0] != "--model" else args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output


def test_token_file_wins_over_the_flag_and_blank_means_none(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert read_token("from-flag-or-env", None) == "from-flag-or-env"
    assert read_token("from-flag-or-env", token_file) == "from-file"
    token_file.write_text("  \n")
    assert read_token(None, token_file) is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "--insecure-no-token"),  # no token at all: refuse to start
        (["--token", "   "], "--insecure-no-token"),  # a blank one is none
        (["--token", "t", "--slo-seconds", "1e-300"], "--slo-seconds"),
        (["--token", "t", "--slo-seconds", "1", "--max-batch-wait-ms", "1000"], "below the SLO"),
        (["--token", "t", "--allowed-next-stage", "http://x:1/#"], "--allowed-next-stage"),
        (["--token", "t", "--next-stage-url", "http://h:1/?p="], "--next-stage-url"),
        (["--token", "t", "--port", "8123", "--next-stage-url", "http://127.0.0.1:8123"], "itself"),
    ],
)
def test_unsafe_start_up_settings_are_refused(
    tiny_models: dict[str, Path],
    args: list[str],
    fragment: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DIFFCASCADE_TOKEN", raising=False)
    base = ["--model", str(tiny_models["light"]), "--variant", "light"]
    result = CliRunner().invoke(serve, base + args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
