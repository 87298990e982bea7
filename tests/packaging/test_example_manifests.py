"""The example cascades are what the docs say: admitted by the CRD and loaded by spec.py."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import click
import pytest
from diffcascade_operator.profiles import profiles_from_spec
from diffcascade_operator.spec import CascadeSpec, load_manifest
from packaging_support import EXAMPLES_DIR, REPO, admission_errors, load_yaml

pytest.importorskip("cel", reason="common-expression-language (dev extra) is not installed")

EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
REFERENCE_LATENCY = REPO / "operator" / "diffcascade_operator" / "reference" / "latency_a100_ms.csv"


def _load(path: Path) -> tuple[dict[str, Any], CascadeSpec]:
    doc: dict[str, Any] = load_yaml(path)
    return doc, load_manifest(doc)[1]


def test_both_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"sdturbo-sdv15.yaml", "tiny-cpu.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_admitted_by_the_crd(path: Path) -> None:
    assert admission_errors(load_yaml(path)) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads_with_spec_py(path: Path) -> None:
    doc, spec = _load(path)
    assert doc["apiVersion"] == "diffcascade.dev/v1alpha1"
    assert len(spec.variants) == 2


def _reference_latency() -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    with REFERENCE_LATENCY.open() as handle:
        for row in csv.DictReader(handle):
            table.setdefault(row["model"], {})[int(row["batch_size"])] = float(row["latency_ms"])
    return table


def test_gpu_example_is_the_papers_cascade() -> None:
    _, spec = _load(EXAMPLES_DIR / "sdturbo-sdv15.yaml")
    light, heavy = spec.variants
    assert (light.model, light.steps, light.guidance_scale, light.resolution) == (
        "hf://stabilityai/sd-turbo", 1, 0.0, 512,
    )  # fmt: skip
    assert (heavy.model, heavy.steps) == ("hf://stable-diffusion-v1-5/stable-diffusion-v1-5", 50)
    # Measured on the user's GPUs (profile.auto); the paper's A100 tables stand in until then.
    assert light.profile.auto and heavy.profile.auto
    reference = _reference_latency()
    assert light.profile.batch_latency_ms == reference["sd-turbo"]
    assert heavy.profile.batch_latency_ms == reference["sd-v1.5"]
    assert light.gate is not None and light.gate.discriminator is not None
    assert light.gate.discriminator.architecture == "clip-score"  # hub weights, no training
    assert (spec.gpu_budget, spec.slo_seconds) == (16, 5.0)
    assert all(v.resources == {"limits": {"nvidia.com/gpu": 1}} for v in spec.variants)


def test_gpu_example_reference_curves_are_bundled() -> None:
    _, spec = _load(EXAMPLES_DIR / "sdturbo-sdv15.yaml")
    profiles = profiles_from_spec(spec)
    assert len(profiles.variants) == 2


def test_tiny_example_matches_what_make_tiny_model_writes() -> None:
    from diffcascade_worker.models import tiny

    _, spec = _load(EXAMPLES_DIR / "tiny-cpu.yaml")
    light, heavy = spec.variants
    assert (light.model, heavy.model) == (".models/tiny-light", ".models/tiny-heavy")
    for variant, kind in zip((light, heavy), tiny.TINY_KINDS, strict=True):
        defaults = tiny.TINY_DEFAULTS[kind]
        assert (variant.steps, variant.guidance_scale) == (defaults.steps, defaults.guidance_scale)
        assert variant.resolution == defaults.size == tiny.TINY_SIZE
        assert max(variant.profile.batch_latency_ms) <= variant.max_batch_size
    assert light.gate is not None and light.gate.discriminator is not None
    assert light.gate.defer_curve is not None
    assert light.gate.discriminator.uri == f"{light.model}/{tiny.GATE_FILE}"
    assert light.gate.defer_curve.path == f"{light.model}/{tiny.CURVE_FILE}"


def test_tiny_example_needs_no_gpu() -> None:
    doc, spec = _load(EXAMPLES_DIR / "tiny-cpu.yaml")
    assert "nvidia.com/gpu" not in str(doc)
    floor = sum(v.min_replicas * v.gpus_per_replica for v in spec.variants)
    assert floor <= spec.gpu_budget == 4


def _commands_in(text: str) -> list[str]:
    return re.findall(r"`diffcascade ([^`]+)`", text)


@pytest.mark.parametrize("path", sorted(EXAMPLES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_diffcascade_command_an_example_mentions_exists_and_parses(path: Path) -> None:
    import shlex

    from diffcascade_operator.cli import main

    for line in _commands_in(path.read_text()):
        name, *args = shlex.split(line)
        command = main.get_command(click.Context(main), name)
        assert command is not None, f"{path.name}: no command `diffcascade {name}`"
        with command.make_context(name, args):  # raises on an unknown option
            pass
