"""The assembly fields: one definition read from spec-style dicts, flags and diffcascade.json."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from diffcascade_worker.models.assembly import (
    AssemblyError,
    PipelineAssembly,
    SchedulerChoice,
    assembly_from_options,
    parse_assembly,
    read_model_defaults,
)

LIGHTNING = {
    "unet": "hf://ByteDance/SDXL-Lightning/sdxl_lightning_2step_unet.safetensors",
    "scheduler": {"class": "EulerDiscreteScheduler", "config": {"timestep_spacing": "trailing"}},
    "weightsVariant": "fp16",
}


def test_flags_say_what_the_fields_say_and_read_back_the_same() -> None:
    assembly = parse_assembly(LIGHTNING, where="spec")
    flags = assembly.flags(unet="/models/x.safetensors")
    assert flags == [
        "--unet=/models/x.safetensors",
        "--scheduler=EulerDiscreteScheduler",
        '--scheduler-config={"timestep_spacing":"trailing"}',
        "--weights-variant=fp16",
    ]
    options = dict(f.removeprefix("--").split("=", 1) for f in flags)
    back = assembly_from_options(
        unet=options["unet"],
        scheduler=options["scheduler"],
        scheduler_config=options["scheduler-config"],
        weights_variant=options["weights-variant"],
    )
    assert back == assembly.model_copy(update={"unet": "/models/x.safetensors"})
    # fetch needs no scheduler: no file depends on it
    assert assembly.flags(for_fetch=True) == [
        f"--unet={LIGHTNING['unet']}",
        "--weights-variant=fp16",
    ]
    assert PipelineAssembly(safety_checker=True).flags() == ["--safety-checker"]
    assert PipelineAssembly().flags() == []


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"scheduler": {"class": "euler"}}, "should match pattern"),
        (
            {"scheduler": {"class": "EulerDiscreteScheduler", "config": {"Spacing": 1}}},
            "snake_case",
        ),
        ({"scheduler": {"class": "EulerDiscreteScheduler", "config": {"x": [1]}}}, "config.x"),
        ({"weightsVariant": "FP16"}, "weightsVariant"),
        ({"unet": ""}, "unet"),
        ({"vae": "x"}, "Extra inputs"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(raw: dict[str, object], says: str) -> None:
    with pytest.raises(AssemblyError, match=says):
        parse_assembly(raw, where="spec")


def test_flag_mistakes_are_usage_errors() -> None:
    with pytest.raises(click.UsageError, match="needs --scheduler"):
        assembly_from_options(scheduler_config='{"timestep_spacing": "trailing"}')
    with pytest.raises(click.UsageError, match="not JSON"):
        assembly_from_options(scheduler="EulerDiscreteScheduler", scheduler_config="{trailing}")
    with pytest.raises(click.UsageError, match="JSON object"):
        assembly_from_options(scheduler="EulerDiscreteScheduler", scheduler_config="[1]")


def test_flags_override_a_folders_record_field_by_field() -> None:
    folder = PipelineAssembly(
        scheduler=SchedulerChoice(class_name="LCMScheduler"), weights_variant="fp16"
    )
    flags = PipelineAssembly(safety_checker=True, weights_variant="bf16")
    merged = flags.over(folder)
    assert merged.scheduler == folder.scheduler
    assert (merged.weights_variant, merged.safety_checker) == ("bf16", True)


def test_diffcascade_json_carries_the_assembly_with_files_resolved_in_the_folder(
    tmp_path: Path,
) -> None:
    record = {"steps": 2, "guidanceScale": 0, **LIGHTNING, "unet": "unet/lightning.safetensors"}
    (tmp_path / "diffcascade.json").write_text(json.dumps(record))
    found = read_model_defaults(tmp_path)
    assert (found["steps"], found["guidance_scale"]) == (2, 0.0)
    assembly = found["assembly"]
    assert assembly.unet == str(tmp_path / "unet" / "lightning.safetensors")
    assert assembly.scheduler.config == {"timestep_spacing": "trailing"}
    assert assembly.weights_variant == "fp16" and assembly.safety_checker is None


def test_a_broken_assembly_record_is_an_error_not_silently_dropped(tmp_path: Path) -> None:
    (tmp_path / "diffcascade.json").write_text(json.dumps({"scheduler": {"class": "trailing"}}))
    with pytest.raises(ValueError, match=r"diffcascade\.json"):
        read_model_defaults(tmp_path)
