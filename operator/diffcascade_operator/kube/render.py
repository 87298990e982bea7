"""`diffcascade render`: every manifest the operator would create for a cascade, before applying.

Like `helm template` or `kubectl diff`: nothing is contacted. The chart's values become the
operator's settings the way the chart's Deployment hands them over (DIFFCASCADE_* variables,
read by `OperatorSettings.from_env`); the cascade is parsed, policy-checked and profiled by
`reconcile.load_spec`, its first plan is `control.initial_plan`, and the manifests are
`manifests.children` (plus `profiling.profile_job` for `profile.auto` variants), adopted by
the cascade with `kopf.adopt`: the operator's own code, with no second renderer beside it.

What only the cluster knows is marked: the config token is generated at apply time, the
owner's uid is set by the API server, and a `profile.auto` variant's measured table replaces
the spec's once its Job is done (until then no worker runs).
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import click
import yaml
from diffcascade_worker.protocol import MAX_EXPLORATION_SHARE, RouterScorerName

from diffcascade_operator import control
from diffcascade_operator.kube import curve_files, manifests, profiling
from diffcascade_operator.kube.reconcile import load_spec, new_state, spec_error_reason
from diffcascade_operator.kube.settings import ENV_PREFIX, OperatorSettings
from diffcascade_operator.spec import API_GROUP, API_VERSION, KIND, InvalidSpec

CHART = Path("helm") / "diffcascade"
TOKEN_PLACEHOLDER = "generated-by-the-operator-at-apply-time"
UID_PLACEHOLDER = "set-by-the-api-server"


class RenderError(ValueError):
    """A cascade or values file that cannot be rendered; the message says why."""


# --- the chart's values -> the operator's settings ---------------------------------------------


def find_chart(start: Path | None = None) -> Path | None:
    """helm/diffcascade of the source tree around `start` (default: here) or this package."""
    starts = [start or Path.cwd(), Path(__file__).resolve().parent]
    for base in starts:
        for folder in (base.resolve(), *base.resolve().parents):
            if (folder / CHART / "Chart.yaml").is_file():
                return folder / CHART
    return None


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's rule: maps merge key by key, anything else replaces; null removes the key."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _image_ref(image: Mapping[str, Any], app_version: str) -> str:
    """The chart's `diffcascade.imageRef`: repository@digest when pinned, else :tag."""
    digest = image.get("digest") or ""
    if digest:
        return f"{image['repository']}@{digest}"
    return f"{image['repository']}:{image.get('tag') or app_version}"


def _text(value: Any) -> str:
    """A value as Helm's `toString` writes it (booleans lower case, whole floats as Go's %v
    writes them: 2, not 2.0)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    return str(value)


_WHOLE = re.compile(r"[0-9]+")
_SHARE = re.compile(r"[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _router_env(values: Mapping[str, Any]) -> dict[str, str]:
    """The chart's router values as its DIFFCASCADE_ROUTER* entries, refused with the chart's
    own messages (its `diffcascade.checkRouter`) where the chart's render fails."""
    router = values.get("router") or {}
    requests = (router.get("resources") or {}).get("requests") or {}
    scorer = router.get("scorer", "learned")
    if scorer not in get_args(RouterScorerName):
        raise RenderError(
            f"router.scorer must be learned, rule or none, not {json.dumps(_text(scorer))}"
        )
    replicas = _text(router.get("replicas", 2))
    if not (_WHOLE.fullmatch(replicas) and int(replicas) >= 1):
        raise RenderError(
            f"router.replicas must be a whole number of at least 1, not {json.dumps(replicas)}"
        )
    port = _text(router.get("port", 8000))
    if not (_WHOLE.fullmatch(port) and 1 <= int(port) <= 65535):
        raise RenderError(
            f"router.port must be a port number from 1 to 65535, not {json.dumps(port)}"
        )
    share = _text(router.get("explorationShare", 0.05))
    if not (_SHARE.fullmatch(share) and float(share) <= MAX_EXPLORATION_SHARE):
        raise RenderError(
            f"router.explorationShare must be a number from 0 to {MAX_EXPLORATION_SHARE:g}, "
            f"not {json.dumps(share)}"
        )
    return {
        "ROUTER": _text(router.get("enabled", True)),
        "ROUTER_REPLICAS": replicas,
        "ROUTER_PORT": port,
        "ROUTER_CPU_REQUEST": _text(requests.get("cpu", "100m")),
        "ROUTER_MEMORY_REQUEST": _text(requests.get("memory", "256Mi")),
        "ROUTER_SCORER": str(scorer),
        "ROUTER_EXPLORATION": share,
    }


def chart_env(
    values: Mapping[str, Any], *, release: str, namespace: str, app_version: str
) -> dict[str, str]:
    """The DIFFCASCADE_* environment the chart gives the operator for these values: its
    Deployment's env entries and the flags the CLI copies into the environment (a packaging
    test renders the chart with Helm and compares)."""
    name = values.get("nameOverride") or "diffcascade"
    selector = {
        "app.kubernetes.io/name": str(name)[:63].rstrip("-"),
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/component": "operator",
    }
    resources = (values.get("workerResources") or {}).get("requests") or {}
    policy = values.get("networkPolicy") or {}
    env = {
        "WORKER_IMAGE": _image_ref(values["workerImage"], app_version),
        "ROUTER_IMAGE": _image_ref(values["image"], app_version),  # the operator's own image
        **_router_env(values),
        "ALLOWED_IMAGE_REGISTRIES": " ".join(values.get("allowedImageRegistries") or []),
        "ALLOWED_ENV_SECRETS": " ".join(values.get("allowedEnvSecrets") or []),
        "WORKER_CPU_REQUEST": _text(resources.get("cpu")),
        "WORKER_MEMORY_REQUEST": _text(resources.get("memory")),
        "MODEL_CACHE_CLAIM": (values.get("modelCache") or {}).get("claimName") or "",
        "NETWORK_POLICY": _text(policy.get("enabled", True)),
        "SCRAPER_PEERS": json.dumps(policy.get("scrapers") or [], separators=(",", ":")),
        "CLIENT_PEERS": json.dumps(policy.get("clients") or [], separators=(",", ":")),
        "DISPATCH": _text(values.get("dispatch", "random")),
        "OPERATOR_NAMESPACE": namespace,
        "OPERATOR_POD_LABELS": json.dumps(selector, separators=(",", ":"), sort_keys=True),
    }
    prometheus = (values.get("prometheus") or {}).get("url")
    if prometheus:
        env["PROMETHEUS_URL"] = str(prometheus)
    if values.get("controlIntervalSeconds") is not None:
        env["INTERVAL"] = _text(values["controlIntervalSeconds"])
    metrics = values.get("metrics") or {}
    if metrics.get("enabled"):
        env["METRICS_PORT"] = _text(metrics.get("port"))
    out = {ENV_PREFIX + k: v for k, v in env.items()}
    for extra in values.get("extraEnv") or []:
        if isinstance(extra, Mapping) and "value" in extra:
            out[str(extra["name"])] = _text(extra["value"])
    return out


def chart_settings(
    chart: Path,
    values_file: Path | None,
    *,
    release: str,
    namespace: str,
) -> OperatorSettings:
    """The operator's settings when installed from `chart` with `values_file` over its
    defaults, as release `release` in `namespace`."""
    defaults = _yaml_mapping(chart / "values.yaml")
    chart_doc = _yaml_mapping(chart / "Chart.yaml")
    override = _yaml_mapping(values_file) if values_file is not None else {}
    values = merge_values(defaults, override)
    env = chart_env(
        values,
        release=release,
        namespace=namespace,
        app_version=str(chart_doc.get("appVersion") or chart_doc.get("version")),
    )
    try:
        return OperatorSettings.from_env(env)
    except ValueError as exc:
        raise RenderError(f"values: {exc}") from None


def _yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RenderError(f"cannot read {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise RenderError(f"{path} is not valid YAML: {exc}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise RenderError(f"{path} must hold a mapping")
    return doc


# --- the cascade -> its manifests --------------------------------------------------------------


class _NoCluster:
    """Render reaches no cluster: a curve file's credentials come from this environment."""

    def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return None


@dataclass(frozen=True)
class Rendered:
    manifests: list[dict[str, Any]]
    notes: list[str]


def render_cascade(
    document: Mapping[str, Any],
    *,
    settings: OperatorSettings,
    namespace: str | None = None,
    now: float | None = None,
) -> Rendered:
    """Every manifest the operator creates for `document` (a DiffusionCascade), in order."""
    if document.get("kind") != KIND or document.get("apiVersion") != f"{API_GROUP}/{API_VERSION}":
        raise RenderError(
            f"not a DiffusionCascade: apiVersion {document.get('apiVersion')!r}, "
            f"kind {document.get('kind')!r} (want {API_GROUP}/{API_VERSION}, {KIND})"
        )
    meta = dict(document.get("metadata") or {})
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise RenderError("metadata.name is required")
    namespace = namespace or meta.get("namespace") or "default"
    raw = dict(document.get("spec") or {})
    try:
        raw = curve_files.resolve_curve_uris(raw, api=_NoCluster(), namespace=namespace)
        spec, profiles = load_spec(new_state(settings), raw, settings=settings, cascade=name)
    except InvalidSpec as exc:
        what = (
            "refused by the operator's policy"
            if spec_error_reason(exc) == "Forbidden"
            else ("invalid")
        )
        hint = ""
        if str(exc).startswith("profiles:"):
            hint = (
                " (files the spec names are read as the operator reads them in its pod: "
                "relative to the working directory here)"
            )
        raise RenderError(f"{namespace}/{name}: the spec is {what}: {exc}{hint}") from None
    plan = control.initial_plan(
        spec=spec, profiles=profiles, now=time.time() if now is None else now
    )
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    auto = [i for i, v in enumerate(spec.variants) if v.profile.auto]
    for index in auto:
        variant = spec.variants[index]
        out.append(
            profiling.profile_job(
                cascade=name,
                namespace=namespace,
                spec=spec,
                index=index,
                key=profiling.profile_key(spec, variant, settings),
                settings=settings,
            )
        )
    if auto:
        names = ", ".join(spec.variants[i].name for i in auto)
        notes.append(
            f"profile.auto ({names}): the Jobs run first; the workers below are created once "
            "every result is stored, and the plan then uses the measured tables"
        )
    out += manifests.children(
        cascade=name,
        namespace=namespace,
        spec=spec,
        plan=plan,
        replicas=plan.replicas(),
        token=TOKEN_PLACEHOLDER,
        settings=settings,
    )
    owner = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {**meta, "name": name, "namespace": namespace, "uid": UID_PLACEHOLDER},
    }
    import kopf

    kopf.adopt(out, owner=owner)  # type: ignore[arg-type]
    notes.append(f"first plan ({plan.solver.status.value}): {plan.reason}")
    return Rendered(manifests=out, notes=notes)


def to_yaml(rendered: Rendered) -> str:
    """`---`-separated documents, each headed by a comment naming it, as `helm template` does."""
    parts = [f"# {note}\n" for note in rendered.notes]
    for manifest in rendered.manifests:
        meta = manifest["metadata"]
        head = f"---\n# {manifest['kind']} {meta.get('namespace')}/{meta['name']}\n"
        parts.append(head + yaml.safe_dump(manifest, sort_keys=False, width=100))
    return "".join(parts)


# --- the command -------------------------------------------------------------------------------


@click.command("render")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "-f",
    "--values",
    "values_file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Your chart values (as for `helm install -f`), over the chart's defaults.",
)
@click.option(
    "--chart",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The chart [default: helm/diffcascade of this source tree].",
)
@click.option(
    "-n", "--namespace", help="The cascade's namespace [default: its metadata, else default]."
)
@click.option("--release", default="diffcascade", show_default=True, help="Helm release name.")
@click.option(
    "--release-namespace",
    default="diffcascade-system",
    show_default=True,
    help="Where the chart (the operator) is installed.",
)
def render(
    file: Path,
    values_file: Path | None,
    chart: Path | None,
    namespace: str | None,
    release: str,
    release_namespace: str,
) -> None:
    """Print every manifest the operator would create for the cascade in FILE.

    Deployments, Services, PodDisruptionBudgets, NetworkPolicies, the token Secret, the plan
    ConfigMap and profiling Jobs, with the chart's policy checks applied, as YAML. Pipe it to
    `kubectl apply --dry-run=server -f -` or `kubectl diff -f -` to compare with a cluster.
    """
    chart = chart or find_chart()
    if chart is None:
        raise click.UsageError("the chart was not found from here: give --chart helm/diffcascade")
    try:
        settings = chart_settings(chart, values_file, release=release, namespace=release_namespace)
        documents = [d for d in yaml.safe_load_all(file.read_text(encoding="utf-8")) if d]
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{file} is not valid YAML: {exc}") from None
    except RenderError as exc:
        raise click.ClickException(str(exc)) from None
    if not documents or not all(isinstance(d, dict) for d in documents):
        raise click.ClickException(f"{file} holds no DiffusionCascade")
    out = []
    for document in documents:
        try:
            out.append(to_yaml(render_cascade(document, settings=settings, namespace=namespace)))
        except RenderError as exc:
            raise click.ClickException(str(exc)) from None
    sys.stdout.write("".join(out))
