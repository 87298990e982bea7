"""Bad cascades are refused twice with the same words: by spec.py (operator, `up`, simulator)
and, where OpenAPI + CEL can say it, by the CRD at admission.

The CRD side runs here without an apiserver: structural defaulting, the OpenAPI schema through
jsonschema, and the CEL rules through cel-rust (`packaging_support`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from diffcascade_operator.spec import InvalidSpec, check_deployable, load_manifest, parse_spec
from packaging_support import (
    EXAMPLES_DIR,
    admission_errors,
    apply_defaults,
    cel_failures,
    crd_schema,
    load_yaml,
    schema_errors,
    walk,
)

pytest.importorskip("cel", reason="common-expression-language (dev extra) is not installed")

Manifest = dict[str, Any]


def _base() -> Manifest:
    doc: Manifest = load_yaml(EXAMPLES_DIR / "tiny-cpu.yaml")
    return doc


@dataclass(frozen=True)
class Case:
    name: str
    change: Callable[[Manifest], None]
    spec_says: str  # a fragment of InvalidSpec's message
    crd_says: str  # a fragment of the admission message


def _set(path: str, value: Any) -> Callable[[Manifest], None]:
    def change(doc: Manifest) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def _drop(path: str) -> Callable[[Manifest], None]:
    def change(doc: Manifest) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        del node[last]

    return change


def _duplicate_names(doc: Manifest) -> None:
    doc["spec"]["variants"][1]["name"] = doc["spec"]["variants"][0]["name"]


def _zero_gpus_unbounded(doc: Manifest) -> None:
    doc["spec"]["variants"][0]["gpusPerReplica"] = 0
    doc["spec"]["variants"][0].pop("maxReplicas", None)


def _long_cascade_and_variant(doc: Manifest) -> None:
    doc["metadata"]["name"] = "a" * 30  # + "-" + 40 characters: 71
    doc["spec"]["variants"][0]["name"] = "l" * 40


CURVE = "spec.variants.0.gate.deferCurve"
LIGHT = "spec.variants.0"

CASES = [
    Case("duplicate-variant-names", _duplicate_names, "must be unique", "must be unique"),
    Case(
        "light-stage-without-defer-curve",
        _drop("spec.variants.0.gate.deferCurve"),
        "needs gate.deferCurve",
        "needs gate.deferCurve",
    ),
    Case(
        "light-stage-without-gate",
        _drop("spec.variants.0.gate"),
        "needs gate.deferCurve",
        "needs gate.deferCurve",
    ),
    Case(
        "max-replicas-below-min",
        _set(f"{LIGHT}.maxReplicas", 0),
        "maxReplicas < minReplicas",
        "maxReplicas < minReplicas",
    ),
    Case(
        "min-replicas-above-budget",
        _set("spec.gpuBudget", 1),
        "above gpuBudget",
        "more GPUs than gpuBudget",
    ),
    Case(
        "defer-curve-with-two-sources",
        _set(f"{CURVE}.reference", "sd-turbo"),
        "exactly one of",
        "exactly one of",
    ),
    Case("defer-curve-without-source", _set(CURVE, {}), "exactly one of", "exactly one of"),
    Case(
        "defer-curve-thresholds-only",
        _set(CURVE, {"thresholds": [0.0, 1.0]}),
        "equal length",
        "equal length",
    ),
    Case(
        "defer-curve-lengths-differ",
        _set(CURVE, {"thresholds": [0.0, 0.5, 1.0], "deferFractions": [0.0, 1.0]}),
        "equal length",
        "equal length",
    ),
    Case(
        "defer-curve-one-point",
        _set(CURVE, {"thresholds": [0.5], "deferFractions": [0.5]}),
        "equal length >= 2",
        "too short",
    ),
    Case(
        "defer-curve-thresholds-decreasing",
        _set(CURVE, {"thresholds": [0.5, 0.2], "deferFractions": [0.1, 0.2]}),
        "must be strictly increasing",
        "must be strictly increasing",
    ),
    Case(
        "defer-curve-fractions-decreasing",
        _set(CURVE, {"thresholds": [0.1, 0.2], "deferFractions": [0.5, 0.2]}),
        "non-decreasing",
        "non-decreasing",
    ),
    Case(
        "defer-fraction-above-one",
        _set(CURVE, {"thresholds": [0.1, 0.2], "deferFractions": [0.5, 1.5]}),
        "must lie in [0, 1]",
        "greater than the maximum of 1",
    ),
    Case(
        "quality-with-two-sources",
        _set("spec.quality.reference", "c1"),
        "either fidByLightShare or reference",
        "either fidByLightShare or reference",
    ),
    Case(
        "quality-without-source",
        _set("spec.quality", {}),
        "either fidByLightShare or reference",
        "either fidByLightShare or reference",
    ),
    Case(
        "quality-one-point",
        _set("spec.quality.fidByLightShare", [{"lightShare": 0.5, "fid": 17.0}]),
        "at least two points",
        "too short",
    ),
    Case(
        "quality-zero-fid",
        _set("spec.quality.fidByLightShare.0.fid", 0),
        "greater than 0",
        "less than or equal to the minimum of 0",
    ),
    Case(
        "quality-table-without-source",
        _set("spec.qualityTable", {}),
        "either rows or reference",
        "either rows or reference",
    ),
    Case(
        "quality-table-with-two-sources",
        _set(
            "spec.qualityTable",
            {
                "reference": "hadis-hybrid",
                "rows": [
                    {
                        "light": "a",
                        "heavy": "b",
                        "routerShare": 0,
                        "escalateShare": 0,
                        "fid": 20,
                    }
                ],
            },
        ),
        "either rows or reference",
        "either rows or reference",
    ),
    Case(
        "quality-table-row-names-an-unknown-variant",
        _set(
            "spec.qualityTable",
            {
                "rows": [
                    {
                        "light": "nope",
                        "heavy": "b",
                        "routerShare": 0.2,
                        "escalateShare": 0,
                        "fid": 20,
                    }
                ]
            },
        ),
        "qualityTable rows must name variants of spec.variants",
        "qualityTable rows must name variants of spec.variants",
    ),
    Case(
        "router-without-scorer-or-reference",
        _set("spec.router", {}),
        "router needs a scorer (rule, learned, none) or a reference",
        "router needs a scorer (rule, learned, none) or a reference",
    ),
    Case(
        "router-none-that-explores",
        _set("spec.router", {"scorer": "none", "explorationShare": 0.1}),
        "'none' routes nothing",
        "'none' routes nothing",
    ),
    Case(
        "router-unknown-scorer",
        _set("spec.router", {"scorer": "oracle"}),
        "'learned', 'rule' or 'none'",
        "is not one of",
    ),
    Case(
        "router-explores-too-much",
        _set("spec.router", {"scorer": "learned", "explorationShare": 0.9}),
        "less than or equal to 0.5",
        "maximum of 0.5",
    ),
    Case(
        "profile-without-table-or-auto",
        _drop(f"{LIGHT}.profile.batchLatencyMs"),
        "needs batchLatencyMs, or auto",
        "needs batchLatencyMs, or auto",
    ),
    Case("variant-name-not-a-dns-label", _set(f"{LIGHT}.name", "Light_1"), "DNS label", "match"),
    Case("variant-name-too-long", _set(f"{LIGHT}.name", "a" * 41), "at most 40", "too long"),
    Case("unknown-objective", _set("spec.objective", "Fastest"), "MaxThreshold", "is not one of"),
    Case(
        "unknown-spec-field",
        _set("spec.replicas", 3),
        "Extra inputs are not permitted",
        "Additional properties are not allowed",
    ),
    Case(
        "unknown-variant-field",
        _set(f"{LIGHT}.gpu", "a100"),
        "Extra inputs are not permitted",
        "Additional properties are not allowed",
    ),
    Case(
        "batch-size-zero",
        _set(f"{LIGHT}.profile.batchLatencyMs", {"0": 10.0}),
        "sizes >= 1",
        "batch sizes (integers >= 1)",
    ),
    Case(
        "batch-size-not-a-number",
        _set(f"{LIGHT}.profile.batchLatencyMs", {"four": 10.0}),
        "valid integer",
        "batch sizes (integers >= 1)",
    ),
    Case(
        "batch-latency-negative",
        _set(f"{LIGHT}.profile.batchLatencyMs", {"1": -5.0}),
        "ms > 0",
        "less than the minimum of 0.01",
    ),
    # Numbers the solver cannot use (issue 16): below 10 us or above an hour a batch latency
    # is a unit error; a replica count beyond 10,000 is one no quota or Deployment expects.
    Case(
        "batch-latency-tiny",
        _set(f"{LIGHT}.profile.batchLatencyMs", {"1": 1e-15}),
        "from 0.01 to 3600000",
        "less than the minimum of 0.01",
    ),
    Case(
        "batch-latency-huge",
        _set(f"{LIGHT}.profile.batchLatencyMs", {"1": 1e10}),
        "from 0.01 to 3600000",
        "greater than the maximum of 3600000",
    ),
    Case(
        "startup-beyond-a-day",
        _set(f"{LIGHT}.profile.startupSeconds", 1e9),
        "less than or equal to 86400",
        "greater than the maximum of 86400",
    ),
    Case(
        "min-replicas-absurd",
        _set(f"{LIGHT}.minReplicas", 10**12),
        "less than or equal to 10000",
        "greater than the maximum of 10000",
    ),
    Case(
        "max-replicas-absurd",
        _set(f"{LIGHT}.maxReplicas", 10**12),
        "less than or equal to 10000",
        "greater than the maximum of 10000",
    ),
    Case(
        "zero-gpus-without-max-replicas",
        _zero_gpus_unbounded,
        "gpusPerReplica 0 needs maxReplicas",
        "gpusPerReplica 0 needs maxReplicas",
    ),
    # Names the apiserver accepts for the cascade but not for its children (issue 16).
    Case(
        "cascade-name-starts-with-a-digit",
        _set("metadata.name", "1abc"),
        "must start with a lowercase letter",
        "must start with a lowercase letter",
    ),
    Case(
        "cascade-name-with-a-dot",
        _set("metadata.name", "my.cascade"),
        "no dots",
        "no dots",
    ),
    Case(
        "cascade-name-too-long-for-a-label",
        _set("metadata.name", "a" * 64),
        "at most 63 characters",
        "at most 63 characters",
    ),
    Case(
        "cascade-and-variant-name-too-long",
        _long_cascade_and_variant,
        "must fit in 63",
        "must fit in 63",
    ),
    Case(
        "batch-latency-table-empty",
        _set(f"{LIGHT}.profile.batchLatencyMs", {}),
        "at least one batch size",
        "should be non-empty",
    ),
    Case(
        "resolution-not-multiple-of-8",
        _set(f"{LIGHT}.resolution", 100),
        "multiple of 8",
        "multiple of 8",
    ),
    Case("steps-zero", _set(f"{LIGHT}.steps", 0), "greater than or equal to 1", "minimum of 1"),
    Case(
        "max-batch-too-big",
        _set(f"{LIGHT}.maxBatchSize", 512),
        "less than or equal to 256",
        "maximum of 256",
    ),
    Case(
        "no-slo", _drop("spec.sloSeconds"), "Field required", "'sloSeconds' is a required property"
    ),
    Case(
        "slo-zero",
        _set("spec.sloSeconds", 0),
        "greater than 0",
        "less than or equal to the minimum of 0",
    ),
    Case("budget-zero", _set("spec.gpuBudget", 0), "greater than or equal to 1", "minimum of 1"),
    Case("no-variants", _set("spec.variants", []), "at least 1 item", "should be non-empty"),
    Case(
        "nine-variants",
        lambda doc: doc["spec"]["variants"].extend(
            copy.deepcopy(doc["spec"]["variants"][1]) | {"name": f"extra-{i}"} for i in range(7)
        ),
        "at most 8 items",
        "is too long",
    ),
    Case("ewma-alpha-zero", _set("spec.control.ewmaAlpha", 0), "greater than 0", "minimum of 0"),
    Case(
        "interval-too-short",
        _set("spec.control.intervalSeconds", 0.01),
        "greater than or equal to 0.1",
        "minimum of 0.1",
    ),
    Case(
        "unknown-architecture",
        _set(f"{LIGHT}.gate.discriminator.architecture", "vit"),
        "efficientnet_v2_s",
        "is not one of",
    ),
    Case(
        "discriminator-without-uri",
        _drop(f"{LIGHT}.gate.discriminator.uri"),
        "Field required",
        "'uri' is a required property",
    ),
    # No phantom deferrals: a stage the plan defers from has a gate its workers run.
    Case(
        "light-stage-with-a-curve-but-no-gate",
        _drop(f"{LIGHT}.gate.discriminator"),
        "has no gate.discriminator",
        "needs gate.discriminator",
    ),
    Case(
        "last-stage-with-a-curve-but-no-gate",
        _set("spec.variants.1.gate", {"deferCurve": {"reference": "sd-turbo"}}),
        "has no gate.discriminator",
        "needs gate.discriminator",
    ),
    Case(
        "simulator-only-cascade-deployed",
        _set("spec.simulatorOnly", True),
        "simulatorOnly",
        "simulatorOnly",
    ),
    # How a pipeline is assembled.
    Case(
        "scheduler-class-not-a-scheduler",
        _set(f"{LIGHT}.scheduler", {"class": "euler"}),
        "should match pattern",
        "does not match",
    ),
    Case(
        "scheduler-without-class",
        _set(f"{LIGHT}.scheduler", {"config": {"timestep_spacing": "trailing"}}),
        "Field required",
        "'class' is a required property",
    ),
    Case(
        "weights-variant-not-a-file-variant",
        _set(f"{LIGHT}.weightsVariant", "FP16!"),
        "should match pattern",
        "does not match",
    ),
]


def _broken(case: Case) -> Manifest:
    doc = _base()
    case.change(doc)
    return doc


def test_the_base_cascade_is_accepted_by_both() -> None:
    doc = _base()
    load_manifest(doc)
    assert admission_errors(doc) == []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_spec_rejects_with_a_clear_message(case: Case) -> None:
    with pytest.raises(InvalidSpec) as caught:
        check_deployable(load_manifest(_broken(case))[1])  # as every deploying driver does
    assert case.spec_says in str(caught.value)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_crd_rejects_at_admission(case: Case) -> None:
    errors = admission_errors(_broken(case))
    assert errors, "the CRD accepted it"
    assert any(case.crd_says in e for e in errors), errors


def test_every_cel_rule_rejects_at_least_one_case() -> None:
    schema = crd_schema()
    fired = set()
    for case in CASES:
        doc = apply_defaults(schema, _broken(case))
        if not schema_errors(schema, doc):
            fired |= {f.rule for f in cel_failures(schema, doc)}
    rules = {
        r["rule"] for _, node in walk(schema) for r in node.get("x-kubernetes-validations", [])
    }
    assert rules - fired == set()


# --- where the two differ, on purpose or by necessity ---------------------------------------


def test_spec_coerces_numeric_strings_the_crd_refuses() -> None:
    # pydantic's lax mode turns "8" into 8; the apiserver checks JSON types.
    doc = _base()
    doc["spec"]["variants"][1]["steps"] = "8"
    assert parse_spec(doc["spec"]).variants[1].steps == 8
    assert any("is not of type 'integer'" in e for e in admission_errors(doc))


def test_spec_reads_padded_batch_sizes_the_crd_refuses() -> None:
    # CEL's int() takes plain decimal strings only; pydantic also strips spaces.
    doc = _base()
    doc["spec"]["variants"][0]["profile"]["batchLatencyMs"] = {" 1": 10.0}
    assert parse_spec(doc["spec"]).variants[0].profile.batch_latency_ms == {1: 10.0}
    assert admission_errors(doc) != []


@pytest.mark.parametrize(
    ("thresholds", "fractions", "message"),
    [
        ([0.0, 0.5, 0.5, 1.0], [0.0, 0.2, 0.3, 1.0], "strictly increasing"),
        ([0.1, 0.2], [0.5, 0.5 - 1e-12], "non-decreasing"),
    ],
)
def test_spec_the_crd_and_profiles_refuse_the_same_defer_curves(
    thresholds: list[float], fractions: list[float], message: str
) -> None:
    # One validator (deferral.validate_curve) behind spec.py and profiles; the CRD says the
    # same through isSorted() and a set-typed thresholds list (repeats refused).
    from diffcascade_operator.profiles import ProfileError, defer_curve_from_spec
    from diffcascade_operator.spec import DeferCurveSpec, InvalidSpec
    from pydantic import ValidationError

    doc = _base()
    doc["spec"]["variants"][0]["gate"]["deferCurve"] = {
        "thresholds": thresholds,
        "deferFractions": fractions,
    }
    with pytest.raises(InvalidSpec, match=message):
        parse_spec(doc["spec"])
    assert admission_errors(doc) != []
    with pytest.raises(ValidationError, match=message):
        DeferCurveSpec.model_validate({"thresholds": thresholds, "deferFractions": fractions})
    with pytest.raises(ProfileError, match=message):
        defer_curve_from_spec(
            DeferCurveSpec.model_construct(
                thresholds=thresholds, defer_fractions=fractions, reference=None, path=None
            )
        )
