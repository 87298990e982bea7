"""One builder of what a worker is told, used by the Kubernetes and the local actuator."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from diffcascade_operator.control import initial_plan
from diffcascade_operator.plan import VariantAllocation
from diffcascade_operator.profiles import profiles_from_spec
from diffcascade_operator.spec import parse_spec
from diffcascade_operator.worker_config import (
    WorkerFiles,
    allowed_next_stages,
    checks_api_keys,
    config_body,
    next_stage,
    plan_id,
    serve_args,
)

CURVE = {"thresholds": [0, 1], "deferFractions": [0, 1]}


def three_stage() -> Any:
    variants = [
        {
            "name": name,
            "model": f"m-{name}",
            "profile": {"batchLatencyMs": {"1": 100 * (k + 1)}},
            **(
                {"gate": {"discriminator": {"uri": "gate.pt"}, "deferCurve": CURVE}}
                if k < 2
                else {}
            ),
        }
        for k, name in enumerate(("light", "mid", "heavy"))
    ]
    return parse_spec({"sloSeconds": 5, "gpuBudget": 4, "variants": variants})


def url(name: str) -> str:
    return f"http://{name}"


def test_next_stage_follows_the_plan_and_defaults_to_the_next_variant() -> None:
    spec = three_stage()
    plan = initial_plan(spec, profiles_from_spec(spec), 0.0)
    skipping = replace(
        plan,
        variants=(
            VariantAllocation("light", 1, 1, 0.3, "heavy"),
            VariantAllocation("mid", 0, 1, 0.0, None),
            VariantAllocation("heavy", 1, 1, None, None),
        ),
    )
    assert next_stage(None, spec, "light") == "mid"
    assert next_stage(skipping, spec, "light") == "heavy"
    assert next_stage(skipping, spec, "mid") == "heavy"
    assert next_stage(skipping, spec, "heavy") is None
    assert allowed_next_stages(spec, "light") == ["mid", "heavy"]
    assert config_body(skipping, "light", spec=spec, stage_url=url)["next_stage_url"] == (
        "http://heavy"
    )
    assert config_body(skipping, "heavy", spec=spec, stage_url=url)["next_stage_url"] == ""
    assert plan_id(skipping) != plan_id(plan)


def test_config_carries_the_plans_threshold_batch_and_one_plan_id() -> None:
    spec = three_stage()
    plan = initial_plan(spec, profiles_from_spec(spec), 0.0)
    body = config_body(plan, "light", spec=spec, stage_url=url)
    light = plan.variants[0]
    assert body["threshold"] == light.threshold and body["batch_size"] == light.batch_size
    assert body["slo_seconds"] == 5.0 and body["plan_id"] == plan_id(plan)
    assert "threshold" not in config_body(plan, "heavy", spec=spec, stage_url=url)
    assert config_body(None, "light", spec=spec, stage_url=url)["plan_id"] == "initial"
    # replicas are not told to workers: the id ignores them
    more = replace(plan, variants=tuple(replace(v, replicas=v.replicas + 3) for v in plan.variants))
    assert plan_id(more) == plan_id(plan)


def test_serve_args_name_the_spec_values_the_next_stage_and_the_allowed_ones() -> None:
    spec = three_stage()
    args = serve_args(
        spec,
        "light",
        cascade="c",
        files=WorkerFiles(model="/cache/light", gate="/cache/gate.pt"),
        stage_url=url,
        extra={"port": "8000"},
    )
    assert args[:3] == ["--model=/cache/light", "--variant=light", "--cascade=c"]
    assert "--gate=/cache/gate.pt" in args and "--slo-seconds=5" in args
    assert "--next-stage-url=http://mid" in args
    assert "--allowed-next-stage=http://heavy" in args and args[-1] == "--port=8000"
    heavy = serve_args(spec, "heavy", cascade="c", files=WorkerFiles("m"), stage_url=url)
    assert not any(a.startswith(("--next-stage-url", "--allowed-next-stage")) for a in heavy)


def test_a_two_stage_config_leaves_the_next_stage_of_the_serve_arguments_alone() -> None:
    spec = three_stage()
    raw = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    raw["variants"] = [raw["variants"][0], raw["variants"][2]]
    pair = parse_spec(raw)
    plan = initial_plan(pair, profiles_from_spec(pair), 0.0)
    assert "next_stage_url" not in config_body(plan, "light", spec=pair, stage_url=url)
    assert "--next-stage-url=http://heavy" in serve_args(
        pair, "light", cascade="c", files=WorkerFiles("m"), stage_url=url
    )


def test_assembly_fields_reach_the_worker_as_it_reads_them() -> None:
    """spec -> serve arguments -> the worker's own flag parser: the same assembly, one
    definition (diffcascade_worker.models.assembly) on both sides."""
    from diffcascade_worker.models.assembly import PipelineAssembly, assembly_from_options
    from diffcascade_worker.serving.serve_command import serve

    raw = three_stage().model_dump(by_alias=True, exclude_none=True)
    raw["variants"][0].update(
        unet="hf://ByteDance/SDXL-Lightning/sdxl_lightning_2step_unet.safetensors",
        scheduler={"class": "EulerDiscreteScheduler", "config": {"timestep_spacing": "trailing"}},
        weightsVariant="fp16",
        safetyChecker=True,
    )
    spec = parse_spec(raw)
    args = serve_args(
        spec,
        "light",
        cascade="c",
        files=WorkerFiles(model="/cache/m", unet="/cache/unet.safetensors"),
        stage_url=url,
    )
    params = serve.make_context("serve", [*args, "--token=t"]).params
    read = assembly_from_options(
        unet=params["unet"],
        scheduler=params["scheduler"],
        scheduler_config=params["scheduler_config"],
        weights_variant=params["weights_variant"],
        safety_checker=params["safety_checker"],
    )
    assert read == spec.variants[0].assembly(unet="/cache/unet.safetensors")
    assert set(PipelineAssembly.model_fields) <= set(type(spec.variants[0]).model_fields)


def test_the_router_alone_checks_keys_when_the_stages_behind_it_are_closed() -> None:
    raw = three_stage().model_dump(by_alias=True, exclude_none=True)
    keyed = parse_spec({**raw, "apiKeys": {"secretName": "client-keys"}})
    names = [None, "light", "mid", "heavy"]  # None: the router

    def checkers(spec: Any, *, router: bool, stages_closed: bool) -> list[str | None]:
        return [
            n for n in names if checks_api_keys(spec, n, router=router, stages_closed=stages_closed)
        ]

    # The router is the one door: a plan may enter anywhere or route straight to heavy.
    assert checkers(keyed, router=True, stages_closed=True) == [None]
    # No router: every stage a plan may enter at or route to, which is any stage.
    assert checkers(keyed, router=False, stages_closed=True) == ["light", "mid", "heavy"]
    # A router but no NetworkPolicy closing the stages: clients can reach them too.
    assert checkers(keyed, router=True, stages_closed=False) == names
    assert checkers(three_stage(), router=False, stages_closed=False) == []  # no keys: open


def test_a_stage_given_the_keys_file_is_told_to_check_them() -> None:
    spec = three_stage()

    def told(files: WorkerFiles, name: str) -> list[str]:
        args = serve_args(spec, name, cascade="c", files=files, stage_url=url)
        return [a for a in args if a.startswith("--api-keys")]

    assert told(WorkerFiles(model="/m", api_keys="/keys"), "heavy") == ["--api-keys=/keys"]
    assert told(WorkerFiles(model="/m"), "light") == []
