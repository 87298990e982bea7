"""The CRD is a valid, structural CustomResourceDefinition whose CEL rules an apiserver accepts."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from packaging_support import (
    KUBERNETES_VERSION,
    apply_defaults,
    crd_schema,
    load_crd,
    served_version,
    to_json_schema,
    walk,
)

cel = pytest.importorskip("cel", reason="common-expression-language (dev extra) is not installed")


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return load_crd()


def test_crd_validates_as_a_customresourcedefinition(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)


def test_crd_names_scope_and_version(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "diffusioncascades.diffcascade.dev"
    assert spec["group"] == "diffcascade.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "DiffusionCascade"
    assert spec["names"]["plural"] == "diffusioncascades"
    assert spec["names"]["singular"] == "diffusioncascade"
    assert spec["names"]["shortNames"] == ["dcas"]
    assert "diffcascade" in spec["names"]["categories"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)


def test_crd_has_a_status_subresource_and_no_scale_subresource(crd: dict[str, Any]) -> None:
    # The operator is the only autoscaler: /scale would invite an HPA to fight it.
    assert served_version(crd)["subresources"] == {"status": {}}


def test_every_schema_node_is_structural() -> None:
    problems = []
    for path, node in walk(crd_schema()):
        preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
        if "type" not in node and not preserve and not node.get("x-kubernetes-int-or-string"):
            problems.append(f"{path or '<root>'}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties together")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties: false is not allowed")
        if node.get("uniqueItems"):
            problems.append(f"{path}: uniqueItems is not allowed")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{path}: array without items")
        for forbidden in ("$ref", "allOf", "oneOf", "anyOf", "not", "definitions"):
            if forbidden in node:
                problems.append(f"{path}: {forbidden} is not used in a structural schema here")
        if node.get("x-kubernetes-list-type") == "map":
            required = set(node["items"].get("required", []))
            missing = set(node["x-kubernetes-list-map-keys"]) - required
            if missing:
                problems.append(f"{path}: list-map keys {missing} must be required")
    assert crd_schema()["properties"]["metadata"] == {"type": "object"}
    assert problems == []


def test_every_default_is_valid_against_its_own_schema() -> None:
    defaults = [(path, node) for path, node in walk(crd_schema()) if "default" in node]
    assert len(defaults) >= 10
    for path, node in defaults:
        value = apply_defaults(node, node["default"])
        errors = list(jsonschema.Draft202012Validator(to_json_schema(node)).iter_errors(value))
        assert errors == [], path


def test_every_cel_rule_compiles_and_has_a_one_line_message() -> None:
    rules = [
        (path, rule)
        for path, node in walk(crd_schema())
        for rule in node.get("x-kubernetes-validations", [])
    ]
    assert len(rules) >= 9
    for path, rule in rules:
        assert isinstance(rule["rule"], str) and rule["rule"].strip(), path
        cel.compile(rule["rule"])
        assert "\n" not in rule["message"], path


def test_lists_and_maps_that_cel_rules_read_are_bounded() -> None:
    # An apiserver rejects a CRD whose rules' estimated cost is unbounded: every list or map
    # in the spec needs maxItems/maxProperties, except free-form ones no rule reads.
    unbounded = []
    for path, node in walk(crd_schema()["properties"]["spec"], ".spec"):
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
        if isinstance(node.get("additionalProperties"), dict) and "maxProperties" not in node:
            unbounded.append(path)
    assert unbounded == [".spec.variants[*].env"]


def test_strings_compared_by_cel_rules_have_a_max_length() -> None:
    variant = crd_schema()["properties"]["spec"]["properties"]["variants"]["items"]
    assert variant["properties"]["name"]["maxLength"] == 40


def _schema_at(path: str) -> dict[str, Any] | None:
    """The schema a printer column's JSONPath reads (filters select list items)."""
    node: dict[str, Any] | None = crd_schema()
    for key in re.sub(r"\[\?\(.*?\)\]", "[]", path).strip(".").split("."):
        if node is None:
            return None
        node = node.get("properties", {}).get(key.removesuffix("[]"))
        if node is not None and key.endswith("[]"):
            node = node.get("items")
    return node


PRINTER_COLUMNS = [
    ("Demand", "number", ".status.demand.qps", 0),
    ("Pair", "string", ".status.allocation.pair", 0),
    ("Router", "number", ".status.allocation.routerShare", 0),
    ("Threshold", "number", ".status.allocation.threshold", 0),
    ("Replicas", "string", ".status.replicasSummary", 0),
    ("FID", "number", ".status.allocation.predictedFID", 0),
    ("Missed", "number", ".status.slo.violationRatio", 0),
    ("Ready", "string", '.status.conditions[?(@.type=="Ready")].status', 0),
    ("Entry", "string", ".status.allocation.entryStage", 1),
    ("P99", "number", ".status.slo.p99Seconds", 1),
    ("Drift", "number", ".status.profiles.maxDistance", 1),
    ("Source", "string", ".status.demand.source", 1),
    ("Solver", "string", ".status.allocation.solver.status", 1),
    ("Objective", "string", ".spec.objective", 1),
    ("Age", "date", ".metadata.creationTimestamp", 0),
]


def test_printer_columns_show_the_decision(crd: dict[str, Any]) -> None:
    columns = served_version(crd)["additionalPrinterColumns"]
    got = [(c["name"], c["type"], c["jsonPath"], c.get("priority", 0)) for c in columns]
    assert got == PRINTER_COLUMNS


@pytest.mark.parametrize(("name", "kind", "path", "priority"), PRINTER_COLUMNS[:-1])
def test_printer_column_paths_are_declared_with_their_type(
    name: str, kind: str, path: str, priority: int
) -> None:
    node = _schema_at(path)
    assert node is not None, f"{name}: {path} is not in the schema"
    assert node["type"] == kind, name


STATUS = {
    "observedGeneration": 3,
    "demand": {
        "qps": 12.4,
        "measuredQps": 12.1,
        "source": "Prometheus",
        "at": "2026-11-25T17:00:00Z",
    },
    "allocation": {
        "threshold": 0.12,
        "deferFraction": 0.47,
        "predictedFID": 16.9,
        "predictedLatencySeconds": 3.1,
        "predictedThroughputQps": 14.0,
        "planId": "a1b2c3d4e5f6",
        "entryStage": "sd-turbo",
        "heavyStage": "sd-v1-5",
        "pair": "sd-turbo->sd-v1-5",
        "routerShare": 0.2,
        "row": {
            "light": "sd-turbo",
            "heavy": "sd-v1-5",
            "routerShare": 0.2,
            "escalateShare": 0.5,
            "heavyShare": 0.6,
            "fid": 19.29,
        },
        "variants": [
            {
                "name": "sd-turbo",
                "replicas": 2,
                "readyReplicas": 2,
                "batchSize": 4,
                "threshold": 0.12,
            },
            {"name": "sd-v1-5", "replicas": 14, "readyReplicas": 12, "batchSize": 8},
        ],
        "solver": {"status": "Optimal", "solveMillis": 7.2, "message": "", "objectiveValue": 16.9},
        "decidedAt": "2026-11-25T17:00:00Z",
        "reason": "demand 12.4 qps",
        "futureField": {"kept": True},
    },
    "replicasSummary": "sd-turbo=2/2 sd-v1-5=14/12",
    "readySummary": "14/16",
    "replicas": 16,
    "readyReplicas": 14,
    "appliedWorkers": 14,
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "AllReplicasReady",
            "message": "every stage has a ready pod",
            "lastTransitionTime": "2026-11-25T17:00:00Z",
            "observedGeneration": 3,
        }
    ],
}


def test_status_schema_accepts_what_the_operator_writes() -> None:
    status_schema = crd_schema()["properties"]["status"]
    errors = jsonschema.Draft202012Validator(to_json_schema(status_schema)).iter_errors(STATUS)
    assert list(errors) == []


def test_status_schema_refuses_a_condition_without_status() -> None:
    status_schema = crd_schema()["properties"]["status"]
    bad = {"conditions": [{"type": "Ready", "status": "Yes"}, {"type": "Degraded"}]}
    errors = list(jsonschema.Draft202012Validator(to_json_schema(status_schema)).iter_errors(bad))
    assert len(errors) == 2


def test_status_schema_accepts_the_measured_slo_the_operator_writes() -> None:
    from diffcascade_operator.live_profiles import histogram_from_buckets
    from diffcascade_operator.measured_slo import (
        EntryTotals,
        SloObservations,
        SloSettings,
        measure,
        slo_summary,
    )

    totals = EntryTotals(
        latency=histogram_from_buckets({1.0: 10.0, 3.0: 30.0, 5.0: 90.0, float("inf"): 100.0}),
        outcomes={"served": 60.0, "deferred": 40.0, "dropped": 5.0},
    )
    measured = measure(SloObservations(totals, 60.0, "Prometheus", 0.0), slo_s=3.0)
    doc = slo_summary(measured, plan=None, slo_s=3.0, settings=SloSettings())
    written = {k: v for k, v in doc.items() if v is not None}  # nulls delete in a merge patch
    status_schema = crd_schema()["properties"]["status"]
    validator = jsonschema.Draft202012Validator(to_json_schema(status_schema))
    assert list(validator.iter_errors({"slo": written})) == []
    assert written["violationRatio"] == round(75 / 105, 4)  # 70 late + 5 dropped of 105
