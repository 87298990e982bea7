"""Scenarios: DiffusionCascade manifests the simulator replays traces against.

`--scenario` takes a bundled name (a file in bench/scenarios) or a path; `--gpus` and
`--slo-seconds` override the manifest and the result is validated again by the spec models.
Annotations `sim.diffcascade.dev/*` state the worker rules a benchmark's own system ran with
(HADIS: random dispatch, admission until 1.5 x SLO, unfinished at 2 x SLO counted dropped);
the simulator applies them to every policy on that scenario.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffcascade_operator.sim.locate import bundled_dir
from diffcascade_operator.spec import CascadeSpec, InvalidSpec, load_manifest, parse_spec


class ScenarioError(ValueError):
    """A scenario that cannot be loaded; the message says which and why."""


_RULE_PREFIX = "sim.diffcascade.dev/"
_DISPATCH = ("least-loaded", "round-robin", "random")


@dataclass(frozen=True)
class SimRules:
    """Worker rules of the system a scenario comes from (defaults: our worker's)."""

    dispatch: str | None = None  # None: the run's choice (least-loaded by default)
    admission_slo_factor: float = 1.0  # start a query until this x SLO after arrival
    drop_after_slo_factor: float | None = None  # answered later than this x SLO: dropped


def sim_rules(annotations: dict[str, Any]) -> SimRules:
    """SimRules from `sim.diffcascade.dev/*` annotations; ScenarioError names a bad one."""
    known = {"dispatch", "admission-slo-factor", "drop-after-slo-factor"}
    rules: dict[str, Any] = {}
    for key, value in annotations.items():
        if not key.startswith(_RULE_PREFIX):
            continue
        name = key.removeprefix(_RULE_PREFIX)
        if name not in known:
            raise ScenarioError(f"unknown annotation {key}; known: {', '.join(sorted(known))}")
        if name == "dispatch":
            if value not in _DISPATCH:
                raise ScenarioError(f"{key}: {value!r} is not one of {', '.join(_DISPATCH)}")
            rules["dispatch"] = value
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ScenarioError(f"{key}: {value!r} is not a number") from None
        if not 1.0 <= number <= 10.0:
            raise ScenarioError(f"{key}: {number:g} must lie in [1, 10]")
        rules[name.replace("-", "_")] = number
    return SimRules(**rules)


@dataclass(frozen=True)
class Scenario:
    name: str
    spec: CascadeSpec
    base_dir: Path  # relative paths in the spec (gate curves) resolve from here: the cwd
    rules: SimRules = SimRules()


def bundled_scenarios() -> list[str]:
    folder = bundled_dir("scenarios")
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def resolve_scenario_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    folder = bundled_dir("scenarios")
    if folder is not None:
        for candidate in (folder / f"{name_or_path}.yaml", folder / name_or_path):
            if candidate.is_file():
                return candidate
    known = ", ".join(bundled_scenarios()) or "none found"
    raise ScenarioError(
        f"scenario {name_or_path!r} is neither a file nor a bundled scenario ({known})"
    )


def load_scenario(
    name_or_path: str, *, gpus: int | None = None, slo_seconds: float | None = None
) -> Scenario:
    path = resolve_scenario_path(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ScenarioError(f"scenario {path}: expected a DiffusionCascade manifest (a mapping)")
    try:
        name, spec = load_manifest(doc)
        spec = override(spec, gpus=gpus, slo_seconds=slo_seconds)
    except InvalidSpec as exc:
        raise ScenarioError(f"scenario {path}: {exc}") from None
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ScenarioError(f"scenario {path}: metadata.annotations must be a mapping")
    rules = sim_rules(annotations)
    # Relative paths resolve from the working directory, as in `up`, `demo` and the operator.
    return Scenario(name=name, spec=spec, base_dir=Path.cwd(), rules=rules)


def override(
    spec: CascadeSpec, *, gpus: int | None = None, slo_seconds: float | None = None, **extra: Any
) -> CascadeSpec:
    """The spec with gpuBudget / sloSeconds (and other camelCase keys) replaced, re-validated."""
    raw = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    if gpus is not None:
        raw["gpuBudget"] = gpus
    if slo_seconds is not None:
        raw["sloSeconds"] = slo_seconds
    raw.update(extra)
    return parse_spec(raw)
