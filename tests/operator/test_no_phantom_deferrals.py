"""No phantom deferrals, in every driver: a stage the plan defers from has a gate its workers
run; cascades that exist only to drive the simulator say so, and only the simulator takes them.
(The CRD's side: tests/packaging/test_invalid_cascades.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from diffcascade_operator.kube import profiling, reconcile
from diffcascade_operator.kube.settings import OperatorSettings
from diffcascade_operator.local.runner import LocalRunError, load_cascade_file
from diffcascade_operator.sim.scenarios import (
    ScenarioError,
    bundled_scenarios,
    load_scenario,
    resolve_scenario_path,
)
from diffcascade_operator.spec import InvalidSpec


def _scenario(name: str = "sdturbo-sdv15") -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(resolve_scenario_path(name).read_text())
    return doc


def test_every_bundled_scenario_is_simulator_only_and_the_simulator_takes_it() -> None:
    assert set(bundled_scenarios()) >= {"sdturbo-sdv15", "sdxs-sdv15", "sdxl-lightning-sdxl"}
    for name in bundled_scenarios():
        spec = load_scenario(name).spec
        assert spec.simulator_only, name
        assert all(v.gate is None or v.gate.discriminator is None for v in spec.variants)


def test_the_simulator_refuses_a_gateless_curve_not_marked_simulator_only(tmp_path: Path) -> None:
    doc = _scenario()
    del doc["spec"]["simulatorOnly"]
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ScenarioError, match=r"has no gate\.discriminator.*simulatorOnly"):
        load_scenario(str(path))


def test_up_refuses_a_simulator_only_cascade(tmp_path: Path) -> None:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(_scenario()))
    with pytest.raises(LocalRunError, match="simulatorOnly: this cascade exists to drive"):
        load_cascade_file(path)


def test_the_operator_refuses_a_simulator_only_cascade_and_profiles_nothing() -> None:
    body = {
        "metadata": {"name": "c", "namespace": "ns", "generation": 1, "uid": "u"},
        "spec": _scenario("sdxl-lightning-sdxl")["spec"],
    }
    settings = OperatorSettings()
    with pytest.raises(InvalidSpec, match="simulatorOnly"):
        reconcile.load_spec(reconcile.new_state(settings), body["spec"], settings=settings)
    body["spec"]["variants"][0]["profile"]["auto"] = True
    outcome = profiling.gate(
        api=None,
        body=body,
        memo=profiling.ProfilingMemo(),
        settings=settings,
        now=0.0,
        adopt=lambda *_: None,
    )
    assert outcome is None  # no Job for a cascade that cannot run (its error is the status)
