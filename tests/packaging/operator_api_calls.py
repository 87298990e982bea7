"""Every Kubernetes API request the operator process can make, derived, not listed by hand.

Two sources, both read from the code rather than from a list kept beside it:
- the operator's own client calls: every module the operator process imports (what importing
  the Kopf handlers module loads) is parsed, and every attribute name that is a method of a
  `kubernetes.client` API class counts, called or only referenced (`prune()` passes
  `delete_namespaced_deployment` around as a function). The method's own request, path and
  HTTP verb, is read from the generated client's source and turned into an RBAC
  (group, resource, verb) the way the apiserver's request-info resolver does;
- Kopf's requests: the handlers registered in Kopf's registry by that import say which
  resources Kopf lists and watches, which it patches (progress annotations and status), and
  Kopf posts core/v1 Events for them.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import inspect
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import kubernetes

Call = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

OPERATOR_MODULE = "diffcascade_operator.kube.handlers"
_RAW = {"call_api", "param_serialize", "DynamicClient"}
#: CustomObjectsApi's paths name no resource; the operator's only custom resource is its own
#: DiffusionCascade (`KubeApi.patch_status`), so its calls are read as calls on that.
_OWN_RESOURCE = {
    "{group}": "diffcascade.dev",
    "{version}": "v1alpha1",
    "{plural}": "diffusioncascades",
}
_REQUEST = re.compile(
    r"""method=['"](GET|POST|PUT|PATCH|DELETE)['"],\s*resource_path=['"](/apis?/[^'"]+)['"]"""
)


@dataclass(frozen=True)
class ClientCall:
    module: str
    line: int
    method: str
    rbac: frozenset[Call]


def rbac_of_request(path: str, http_verb: str) -> Call | None:
    """(group, resource, verb) of a request path, as the apiserver authorizes it; None for
    discovery (non-resource URLs every authenticated user may read)."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = (parts[1], parts[3:]) if len(parts) >= 3 else ("", [])
    watch = rest[:1] == ["watch"]
    rest = rest[1:] if watch else rest
    if rest[:2] == ["namespaces", "{namespace}"] and len(rest) >= 3:
        rest = rest[2:]  # namespaces/{namespace}/<resource>...
    if not rest:
        return None
    if watch:
        return group, rest[0], "watch"
    resource, named, sub = rest[0], len(rest) >= 2, rest[2] if len(rest) >= 3 else None
    verb = {
        ("GET", True): "get",
        ("GET", False): "list",
        ("POST", False): "create",
        ("POST", True): "create",  # a subresource such as pods/eviction
        ("PUT", True): "update",
        ("PATCH", True): "patch",
        ("DELETE", True): "delete",
        ("DELETE", False): "deletecollection",
    }[(http_verb, named)]
    return group, resource + (f"/{sub}" if sub else ""), verb


@functools.cache
def api_methods() -> dict[str, frozenset[Call]]:
    """method name -> the RBAC requests it makes, for every kubernetes.client API class."""
    table: dict[str, set[Call]] = {}
    for _, cls in inspect.getmembers(kubernetes.client, inspect.isclass):
        if not cls.__name__.endswith("Api") or not hasattr(cls, "__init__"):
            continue
        for name, _fn in inspect.getmembers(cls, inspect.isfunction):
            if name.startswith("_") or name.endswith("_with_http_info"):
                continue
            # The generated client builds each request in `_<method>_serialize`.
            impl = getattr(cls, f"_{name}_serialize", None)
            if impl is None:
                continue
            for verb, path in _REQUEST.findall(inspect.getsource(impl)):
                for placeholder, value in _OWN_RESOURCE.items():
                    path = path.replace(placeholder, value)
                call = rbac_of_request(path, verb)
                if call is not None:
                    table.setdefault(name, set()).add(call)
    return {k: frozenset(v) for k, v in table.items()}


def operator_modules() -> list[str]:
    """The project modules the operator process loads (imported in a clean interpreter)."""
    code = (
        f"import sys, json, {OPERATOR_MODULE}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('diffcascade'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    modules: list[str] = json.loads(out.strip().splitlines()[-1])
    return modules


def client_calls(modules: list[str] | None = None) -> list[ClientCall]:
    """Every reference to a Kubernetes client API method in the operator's modules."""
    table = api_methods()
    found: list[ClientCall] = []
    for module in modules if modules is not None else operator_modules():
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(Path(spec.origin).read_text(), filename=spec.origin)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in _RAW:
                raise AssertionError(
                    f"{module}:{node.lineno}: {node.attr} sends a request this test cannot "
                    "attribute to a resource; call the typed API method instead"
                )
            if isinstance(node, ast.Attribute) and node.attr in table:
                found.append(ClientCall(module, node.lineno, node.attr, table[node.attr]))
    return found


def _resource_group(plural: str) -> str:
    groups = {
        g for calls in api_methods().values() for g, r, _ in calls if r == plural and "/" not in r
    }
    preferred = groups - {"extensions"}
    if len(preferred) != 1:
        raise ValueError(f"cannot tell which API group {plural!r} is in: {sorted(groups)}")
    return preferred.pop()


def kopf_calls() -> set[Call]:
    """What Kopf requests for the handlers the operator registers."""
    code = (
        f"import json, kopf, {OPERATOR_MODULE}\n"
        "r = kopf.get_default_registry()\n"
        "out = []\n"
        "for kind in ('_indexing', '_watching', '_changing', '_spawning'):\n"
        "    for h in getattr(r, kind).get_all_handlers():\n"
        "        s = h.selector\n"
        "        out.append([kind, s.group, s.plural or s.any_name])\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    calls: set[Call] = set()
    for kind, group, plural in json.loads(out.strip().splitlines()[-1]):
        group = group if group is not None else _resource_group(plural)
        calls |= {(group, plural, "list"), (group, plural, "watch")}
        if kind in ("_changing", "_spawning"):
            # Progress annotations on the object, the handlers' results on its status.
            calls |= {(group, plural, "patch"), (group, f"{plural}/status", "patch")}
            calls |= {("", "events", "create")}
    return calls


def operator_calls() -> set[Call]:
    calls = kopf_calls()
    for call in client_calls():
        calls |= call.rbac
    return calls
