"""crds/diffusioncascade.yaml and operator/diffcascade_operator/spec.py describe one spec.

Walks the pydantic model's JSON schema (by alias) beside the CRD's `.spec` schema: a field,
a default, an enum or a bound added to one and not the other fails here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from diffcascade_operator import spec as spec_module
from diffcascade_operator.spec import CascadeSpec
from packaging_support import crd_schema

Schema = dict[str, Any]

#: Bounds only the CRD states, each for a reason (spec.py checks the same in a validator, or
#: an apiserver needs the bound to cost CEL rules).
CRD_ONLY: dict[tuple[str, str], str] = {
    (".variants[*].name", "pattern"): "spec.py: field_validator _dns_label",
    (".variants[*].profile.batchLatencyMs", "minProperties"): "spec.py: _positive",
    (".variants[*].profile.batchLatencyMs", "maxProperties"): "CEL cost bound",
    (".variants[*].profile.batchLatencyMs{*}", "minimum"): "spec.py: MIN_BATCH_LATENCY_MS",
    (".variants[*].profile.batchLatencyMs{*}", "maximum"): "spec.py: MAX_BATCH_LATENCY_MS",
    (".variants[*].gate.deferCurve.thresholds", "minItems"): "spec.py: _one_source (>= 2)",
    (".variants[*].gate.deferCurve.thresholds", "maxItems"): "CEL cost bound",
    (".variants[*].gate.deferCurve.thresholds[*]", "minimum"): "spec.py: values in [0, 1]",
    (".variants[*].gate.deferCurve.thresholds[*]", "maximum"): "spec.py: values in [0, 1]",
    (".variants[*].gate.deferCurve.deferFractions", "minItems"): "spec.py: _one_source (>= 2)",
    (".variants[*].gate.deferCurve.deferFractions", "maxItems"): "CEL cost bound",
    (".variants[*].gate.deferCurve.deferFractions[*]", "minimum"): "spec.py: values in [0, 1]",
    (".variants[*].gate.deferCurve.deferFractions[*]", "maximum"): "spec.py: values in [0, 1]",
    (".quality.fidByLightShare", "minItems"): "spec.py: _one_source (>= 2 points)",
    (".quality.fidByLightShare", "maxItems"): "CEL cost bound",
}

BOUNDS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
)


def _resolve(node: Schema, defs: dict[str, Schema]) -> Schema:
    """Follow $ref and drop the `| None` branch of optional fields, keeping the default."""
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        assert len(branches) == 1, node
        node = {**branches[0], **{k: v for k, v in node.items() if k != "anyOf"}}
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**_resolve(target, defs), **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _pydantic_bounds(node: Schema) -> dict[str, Any]:
    """Pydantic writes draft 2020-12 (numeric exclusive bounds); the CRD writes OpenAPI 3.0."""
    out = {k: node[k] for k in BOUNDS if k in node}
    for key, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if key in out:
            out[bound] = out.pop(key)
            out[key] = True
    return out


def _crd_bounds(node: Schema) -> dict[str, Any]:
    return {k: node[k] for k in BOUNDS if k in node}


def _pairs(py: Schema, crd: Schema, defs: dict[str, Schema], path: str) -> Iterator[Any]:
    py = _resolve(py, defs)
    yield path, py, crd
    if "properties" in py or "properties" in crd:
        for name in sorted(set(py.get("properties", {})) & set(crd.get("properties", {}))):
            yield from _pairs(
                py["properties"][name], crd["properties"][name], defs, f"{path}.{name}"
            )
    if isinstance(py.get("items"), dict) and isinstance(crd.get("items"), dict):
        yield from _pairs(py["items"], crd["items"], defs, f"{path}[*]")
    py_extra, crd_extra = py.get("additionalProperties"), crd.get("additionalProperties")
    if isinstance(py_extra, dict) and isinstance(crd_extra, dict):
        yield from _pairs(py_extra, crd_extra, defs, f"{path}{{*}}")


def _all_pairs() -> list[tuple[str, Schema, Schema]]:
    pydantic_schema = CascadeSpec.model_json_schema(by_alias=True)
    crd_spec = crd_schema()["properties"]["spec"]
    return list(_pairs(pydantic_schema, crd_spec, pydantic_schema["$defs"], ""))


PAIRS = _all_pairs()
IDS = [path or ".spec" for path, _, _ in PAIRS]


def test_the_walk_reaches_every_level() -> None:
    paths = set(IDS)
    assert {
        ".variants[*].gate.deferCurve.thresholds[*]",
        ".quality.fidByLightShare[*].fid",
    } <= paths
    assert ".variants[*].profile.batchLatencyMs{*}" in paths
    assert len(PAIRS) >= 45


@pytest.mark.parametrize(("path", "py", "crd"), PAIRS, ids=IDS)
def test_same_property_names(path: str, py: Schema, crd: Schema) -> None:
    if crd.get("x-kubernetes-preserve-unknown-fields"):
        assert "properties" not in py, path  # free-form in both (resources, env items)
        return
    assert set(py.get("properties", {})) == set(crd.get("properties", {})), path


@pytest.mark.parametrize(("path", "py", "crd"), PAIRS, ids=IDS)
def test_same_required_fields(path: str, py: Schema, crd: Schema) -> None:
    assert set(py.get("required", [])) == set(crd.get("required", [])), path


@pytest.mark.parametrize(("path", "py", "crd"), PAIRS, ids=IDS)
def test_same_types(path: str, py: Schema, crd: Schema) -> None:
    assert py.get("type", "object") == crd["type"], path


@pytest.mark.parametrize(("path", "py", "crd"), PAIRS, ids=IDS)
def test_same_defaults(path: str, py: Schema, crd: Schema) -> None:
    py_default = py.get("default")
    if isinstance(py_default, dict):  # control: pydantic spells out ControlSpec(); CRD says {}
        assert crd.get("default") == {}, path
        py_fields = {k: v for k, v in py_default.items() if v is not None}
        crd_fields = {k: s["default"] for k, s in crd["properties"].items() if "default" in s}
        assert py_fields == crd_fields, path
    else:
        assert py_default == crd.get("default"), path


@pytest.mark.parametrize(("path", "py", "crd"), PAIRS, ids=IDS)
def test_same_enums(path: str, py: Schema, crd: Schema) -> None:
    assert py.get("enum") == crd.get("enum"), path


@pytest.mark.parametrize(("path", "py", "crd"), PAIRS, ids=IDS)
def test_same_bounds(path: str, py: Schema, crd: Schema) -> None:
    py_bounds, crd_bounds = _pydantic_bounds(py), _crd_bounds(crd)
    for key, value in py_bounds.items():
        assert crd_bounds.get(key) == value, f"{path} {key}"
    extra = {k for k in crd_bounds if k not in py_bounds}
    if crd_bounds.get("exclusiveMinimum") and (path, "minimum") in CRD_ONLY:
        extra.discard("exclusiveMinimum")
    unexplained = {k for k in extra if (path, k) not in CRD_ONLY}
    assert unexplained == set(), f"{path}: CRD-only bounds {unexplained}"


def test_every_crd_only_bound_still_exists() -> None:
    present = {(path, k) for path, _, crd in PAIRS for k in _crd_bounds(crd)}
    assert set(CRD_ONLY) <= present


def test_batch_latency_bounds_are_spec_pys() -> None:
    variant = crd_schema()["properties"]["spec"]["properties"]["variants"]["items"]
    ms = variant["properties"]["profile"]["properties"]["batchLatencyMs"]["additionalProperties"]
    assert (ms["minimum"], ms["maximum"]) == (
        spec_module.MIN_BATCH_LATENCY_MS,
        spec_module.MAX_BATCH_LATENCY_MS,
    )


def test_cascade_name_rules_are_spec_pys() -> None:
    rules = " ".join(r["rule"] for r in crd_schema().get("x-kubernetes-validations", []))
    assert f"matches('{spec_module._DNS_1035_LABEL.pattern}')" in rules
    assert f"size(self.metadata.name) <= {spec_module.MAX_CHILD_NAME}" in rules
    assert f"size(v.name) <= {spec_module.MAX_CHILD_NAME - 1}" in rules


def test_variant_name_pattern_is_spec_pys_dns_label() -> None:
    variant = crd_schema()["properties"]["spec"]["properties"]["variants"]["items"]
    assert variant["properties"]["name"]["pattern"] == spec_module._DNS_LABEL.pattern
