"""Scenarios: DiffusionCascade manifests the simulator replays traces against.

`--scenario` takes a bundled name (a file in bench/scenarios) or a path; `--gpus` and
`--slo-seconds` override the manifest and the result is validated again by the spec models.
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


@dataclass(frozen=True)
class Scenario:
    name: str
    spec: CascadeSpec
    base_dir: Path  # relative paths in the spec (gate curves) resolve from here: the cwd


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
    # Relative paths resolve from the working directory, as in `up`, `demo` and the operator.
    return Scenario(name=name, spec=spec, base_dir=Path.cwd())


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
