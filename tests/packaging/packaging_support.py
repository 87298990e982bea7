"""What the packaging tests share: the CRD's schema read the way an apiserver reads it.

An apiserver defaults a custom resource from the schema, validates it against the OpenAPI
schema, then runs the CEL rules. No apiserver runs here, so these helpers do the same steps:
structural defaulting, a JSON-Schema translation (jsonschema does the validating) and CEL
evaluation with the `cel` package (cel-rust), plus the two Kubernetes list functions the CRD
uses (`isSorted`, `sum`), which are not standard CEL.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "diffusioncascade.yaml"
CHART_DIR = REPO / "helm" / "diffcascade"
EXAMPLES_DIR = REPO / "examples"
KUBERNETES_VERSION = "1.30.0"

Schema = dict[str, Any]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_crd() -> dict[str, Any]:
    crd: dict[str, Any] = load_yaml(CRD_PATH)
    return crd


def served_version(crd: dict[str, Any], name: str = "v1alpha1") -> dict[str, Any]:
    for version in crd["spec"]["versions"]:
        if version["name"] == name:
            found: dict[str, Any] = version
            return found
    raise KeyError(name)


def crd_schema(crd: dict[str, Any] | None = None) -> Schema:
    schema: Schema = served_version(crd or load_crd())["schema"]["openAPIV3Schema"]
    return schema


def children(schema: Schema) -> Iterator[tuple[str, Schema]]:
    """(path suffix, sub-schema) of every direct child schema."""
    for name, sub in schema.get("properties", {}).items():
        yield f".{name}", sub
    if isinstance(schema.get("items"), dict):
        yield "[*]", schema["items"]
    if isinstance(schema.get("additionalProperties"), dict):
        yield "{*}", schema["additionalProperties"]


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every node of a schema with its path, e.g. `.spec.variants[*].name`."""
    yield path, schema
    for suffix, sub in children(schema):
        yield from walk(sub, path + suffix)


def apply_defaults(schema: Schema, value: Any) -> Any:
    """A copy of `value` defaulted as an apiserver does (object fields only, top down)."""
    value = copy.deepcopy(value)
    _default_in_place(schema, value)
    return value


def _default_in_place(schema: Schema, value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default_in_place(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                _default_in_place(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_in_place(schema["items"], item)


def to_json_schema(schema: Schema) -> Schema:
    """Draft 2020-12 JSON Schema for an OpenAPI v3 structural schema.

    Unknown fields are rejected (like `kubectl apply --validate=strict`, which makes the
    apiserver fail on fields the schema would prune) except under
    x-kubernetes-preserve-unknown-fields. `metadata` (an object with no properties) is left
    open: the apiserver checks it as ObjectMeta.
    """
    out: Schema = {}
    for key, val in schema.items():
        if key == "x-kubernetes-list-type" and val == "set":
            out["uniqueItems"] = True  # what the apiserver enforces for a set-typed list
            continue
        if key.startswith("x-kubernetes-") or key in {"description", "default", "nullable"}:
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in val.items()}
        elif key in {"items", "additionalProperties"} and isinstance(val, dict):
            out[key] = to_json_schema(val)
        elif key in {"exclusiveMinimum", "exclusiveMaximum"}:
            if val:
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[key] = schema[bound]
        else:
            out[key] = val
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        bound = "minimum" if key == "exclusiveMinimum" else "maximum"
        if key in out:
            out.pop(bound, None)
    if schema.get("nullable"):
        out["type"] = [out["type"], "null"]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
    closed = "properties" in out and "additionalProperties" not in out
    if out.get("type") == "object" and not preserve and closed:
        out["additionalProperties"] = False
    return out


def schema_errors(schema: Schema, value: Any) -> list[str]:
    """OpenAPI validation messages for `value` (empty: valid)."""
    validator = jsonschema.Draft202012Validator(to_json_schema(schema))
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(value)
    ]


# --- CEL -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CelFailure:
    path: str
    rule: str
    message: str


def _is_sorted(items: list[Any]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(items))


def _sum(items: list[Any]) -> Any:
    return sum(items)


def evaluate_rule(rule: str, self_value: Any) -> bool:
    """Evaluate one x-kubernetes-validations rule; an evaluation error counts as a rejection,
    as it does in an apiserver."""
    import cel

    context = cel.Context()
    context.add_function("isSorted", _is_sorted)
    context.add_function("sum", _sum)
    context.add_variable("self", self_value)
    try:
        return cel.evaluate(rule, context) is True
    except (RuntimeError, ValueError, TypeError):
        return False


def cel_failures(schema: Schema, value: Any, path: str = "") -> list[CelFailure]:
    """Every failing CEL rule for an (already defaulted) value, child rules included."""
    failures: list[CelFailure] = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not evaluate_rule(rule["rule"], value):
            failures.append(CelFailure(path, rule["rule"], rule.get("message", rule["rule"])))
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                failures += cel_failures(sub, value[name], f"{path}.{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                failures += cel_failures(extra, item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            failures += cel_failures(schema["items"], item, f"{path}[{index}]")
    return failures


def admission_errors(manifest: dict[str, Any]) -> list[str]:
    """What an apiserver with this CRD would say about a manifest: defaulting, the OpenAPI
    schema, then CEL (only on a schema-valid object: the rules assume the declared types)."""
    schema = crd_schema()
    defaulted = apply_defaults(schema, manifest)
    errors = schema_errors(schema, defaulted)
    if errors:
        return errors
    return [f"{f.path or '<root>'}: {f.message}" for f in cel_failures(schema, defaulted)]
