"""How a variant's pipeline is assembled: the one definition every side reads.

A hub pipeline is not always what a cascade serves: SDXL-Lightning is SDXL base with one UNet
file of ByteDance's and Euler with "trailing" timesteps, most repositories hold fp16 weights
beside the fp32 ones, and SD v1.5's safety checker turns flagged images black. These fields say
so, with the same names (camelCase, as in the DiffusionCascade spec) wherever they are written:

    unet            a replacement for the base pipeline's UNet (or transformer): a state-dict
                    file (.safetensors/.bin, the base's own config) or a diffusers model folder
    scheduler       {class: EulerDiscreteScheduler, config: {timestep_spacing: trailing}}: the
                    scheduler class, built from the base's scheduler config plus these fields
    weightsVariant  the weights file variant to fetch and load, e.g. fp16
    safetyChecker   run the pipeline's safety checker (default off; a flagged image is then
                    marked in the response)

The spec (`diffcascade_operator.spec.VariantSpec`), the worker's `serve`/`profile`/`fetch` flags
(`assembly_options`) and a model folder's `diffcascade.json` (`read_model_defaults`) all go
through `PipelineAssembly`. Torch-free: the operator imports it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

DEFAULTS_FILE = "diffcascade.json"

#: A diffusers scheduler class name (all of them end in "Scheduler").
SCHEDULER_CLASS = r"^[A-Z][A-Za-z0-9]*Scheduler$"
#: A config field of a diffusers scheduler, as diffusers spells it (snake_case).
SCHEDULER_FIELD = re.compile(r"^[a-z][a-z0-9_]*$")
#: A weights file variant as diffusers names it: `model.<variant>.safetensors`.
WEIGHTS_VARIANT = r"^[a-z0-9][a-z0-9_]{0,15}$"

ConfigValue = str | int | float | bool


class SchedulerChoice(BaseModel):
    """A scheduler class and the config fields to change on the base's scheduler config."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    class_name: str = Field(
        alias="class",
        pattern=SCHEDULER_CLASS,
        description="A diffusers scheduler class, e.g. EulerDiscreteScheduler",
    )
    config: dict[str, ConfigValue] = Field(
        default_factory=dict,
        description="Scheduler config fields in diffusers' spelling, e.g. "
        "timestep_spacing: trailing",
    )

    @field_validator("config")
    @classmethod
    def _field_names(cls, value: dict[str, ConfigValue]) -> dict[str, ConfigValue]:
        bad = [key for key in value if not SCHEDULER_FIELD.match(key)]
        if bad:
            raise ValueError(
                f"scheduler config fields are diffusers' snake_case names, got {bad} "
                "(e.g. timestep_spacing)"
            )
        return value

    def describe(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in sorted(self.config.items()))
        return f"{self.class_name}({fields})" if fields else self.class_name


class PipelineAssembly(BaseModel):
    """What is loaded besides the base pipeline, and how (all optional)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    unet: str | None = Field(
        default=None,
        min_length=1,
        description="Replacement UNet (or transformer): a state-dict file or a model folder",
    )
    scheduler: SchedulerChoice | None = None
    weights_variant: str | None = Field(
        default=None, pattern=WEIGHTS_VARIANT, description="Weights file variant, e.g. fp16"
    )
    safety_checker: bool | None = Field(
        default=None, description="Run the pipeline's safety checker (None: not said, off)"
    )

    @property
    def runs_safety_checker(self) -> bool:
        return bool(self.safety_checker)

    def over(self, base: PipelineAssembly) -> PipelineAssembly:
        """These fields where set, else `base`'s (flags over a model folder's record)."""
        return PipelineAssembly(
            unet=self.unet if self.unet is not None else base.unet,
            scheduler=self.scheduler if self.scheduler is not None else base.scheduler,
            weights_variant=(
                self.weights_variant if self.weights_variant is not None else base.weights_variant
            ),
            safety_checker=(
                self.safety_checker if self.safety_checker is not None else base.safety_checker
            ),
        )

    def flags(self, *, unet: str | None = None, for_fetch: bool = False) -> list[str]:
        """`--flag=value` arguments that say this to `serve`/`profile` (or to `fetch`).

        `unet` is where the replacement is found by the process (a path in the pod), or the
        URI to fetch it from. `fetch` needs no scheduler: it changes no file to download.
        """
        unet = unet if unet is not None else self.unet
        args = [f"--unet={unet}"] if unet is not None else []
        if self.scheduler is not None and not for_fetch:
            args.append(f"--scheduler={self.scheduler.class_name}")
            if self.scheduler.config:
                config = json.dumps(self.scheduler.config, sort_keys=True, separators=(",", ":"))
                args.append(f"--scheduler-config={config}")
        if self.weights_variant is not None:
            args.append(f"--weights-variant={self.weights_variant}")
        if self.safety_checker:
            args.append("--safety-checker")
        return args

    def describe(self) -> str:
        parts = []
        if self.unet is not None:
            parts.append(f"unet {self.unet}")
        if self.scheduler is not None:
            parts.append(f"scheduler {self.scheduler.describe()}")
        if self.weights_variant is not None:
            parts.append(f"{self.weights_variant} weights")
        parts.append("safety checker on" if self.safety_checker else "safety checker off")
        return ", ".join(parts)


class AssemblyError(ValueError):
    """Assembly fields that cannot be used; the message names each field and why."""


def parse_assembly(raw: Mapping[str, Any], *, where: str) -> PipelineAssembly:
    """Validate camelCase assembly fields (a spec's, a flag set's, a diffcascade.json's)."""
    try:
        return PipelineAssembly.model_validate(dict(raw))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'assembly'}: {e['msg']}"
            for e in error.errors()
        )
        raise AssemblyError(f"{where}: {problems}") from None


# --- the command-line side: serve, profile, gate calibrate and fetch take the same flags -----

F = TypeVar("F", bound=Callable[..., Any])


def assembly_options(*, envvar_prefix: str | None = None, fetch: bool = False) -> Callable[[F], F]:
    """Click options for the assembly fields; `assembly_from_options` reads them back.

    `fetch` takes a storage URI for --unet and no scheduler flags (no file depends on them).
    """

    def env(name: str) -> str | None:
        return None if envvar_prefix is None else envvar_prefix + name

    options = [
        click.option(
            "--unet",
            default=None,
            envvar=env("UNET"),
            help=(
                "replacement UNet to fetch (storage URI): its file(s), not the base's UNet weights"
                if fetch
                else "replacement UNet (or transformer): a state-dict file loaded with the "
                "base's config, or a diffusers model folder"
            ),
        ),
        click.option(
            "--weights-variant",
            default=None,
            envvar=env("WEIGHTS_VARIANT"),
            help="weights file variant to "
            + ("fetch" if fetch else "load")
            + ", e.g. fp16 (model.fp16.safetensors)",
        ),
        click.option(
            "--safety-checker/--no-safety-checker",
            default=None,
            envvar=env("SAFETY_CHECKER"),
            help="run the pipeline's safety checker [default: the model folder's, else off]"
            + ("; off: its weights are not fetched" if fetch else ""),
        ),
    ]
    if not fetch:
        options += [
            click.option(
                "--scheduler",
                default=None,
                envvar=env("SCHEDULER"),
                help="diffusers scheduler class, e.g. EulerDiscreteScheduler",
            ),
            click.option(
                "--scheduler-config",
                default=None,
                envvar=env("SCHEDULER_CONFIG"),
                help='scheduler config fields as JSON, e.g. {"timestep_spacing": "trailing"}',
            ),
        ]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def assembly_from_options(
    *,
    unet: str | None = None,
    scheduler: str | None = None,
    scheduler_config: str | None = None,
    weights_variant: str | None = None,
    safety_checker: bool | None = None,
) -> PipelineAssembly:
    """The flags of `assembly_options` as a `PipelineAssembly`; a UsageError says what is wrong."""
    raw: dict[str, Any] = {
        "unet": unet,
        "weightsVariant": weights_variant,
        "safetyChecker": safety_checker,
    }
    if scheduler_config is not None and scheduler is None:
        raise click.UsageError("--scheduler-config needs --scheduler (the class to configure)")
    if scheduler is not None:
        config: Any = {}
        if scheduler_config:
            try:
                config = json.loads(scheduler_config)
            except ValueError as error:
                raise click.UsageError(f"--scheduler-config is not JSON: {error}") from None
            if not isinstance(config, dict):
                raise click.UsageError("--scheduler-config must be a JSON object")
        raw["scheduler"] = {"class": scheduler, "config": config}
    try:
        return parse_assembly(raw, where="pipeline flags")
    except AssemblyError as error:
        raise click.UsageError(str(error)) from None


# --- diffcascade.json: the run settings recorded in a model folder --------------------------

_ASSEMBLY_KEYS = ("unet", "scheduler", "weightsVariant", "safetyChecker")


def read_model_defaults(model_dir: Path | str) -> dict[str, Any]:
    """Settings recorded in `<dir>/diffcascade.json`; {} when there is none (e.g. a hub id).

    Keys (each optional): kind, steps, guidance_scale, size, gate (Path), defer_curve (Path),
    assembly (PipelineAssembly, its unet resolved against the folder). File names are
    resolved against the folder. A record that breaks the rules is a ValueError.
    """
    folder = Path(model_dir)
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    out: dict[str, Any] = {}
    if "kind" in data:
        out["kind"] = str(data["kind"])
    if "steps" in data:
        out["steps"] = int(data["steps"])
    if "guidanceScale" in data:
        out["guidance_scale"] = float(data["guidanceScale"])
    if "size" in data:
        out["size"] = int(data["size"])
    if data.get("gate"):
        out["gate"] = folder / str(data["gate"])
    if data.get("deferCurve"):
        out["defer_curve"] = folder / str(data["deferCurve"])
    found = {key: data[key] for key in _ASSEMBLY_KEYS if key in data}
    if found:
        try:
            assembly = parse_assembly(found, where=str(path))
        except AssemblyError as error:
            raise ValueError(str(error)) from None
        if assembly.unet is not None:
            assembly = assembly.model_copy(update={"unet": str(folder / assembly.unet)})
        out["assembly"] = assembly
    return out


def write_model_defaults(model_dir: Path | str, record: Mapping[str, Any]) -> Path:
    """Write `record` (camelCase keys, as `read_model_defaults` reads them) to diffcascade.json."""
    path = Path(model_dir) / DEFAULTS_FILE
    path.write_text(json.dumps(dict(record), indent=1) + "\n")
    return path
