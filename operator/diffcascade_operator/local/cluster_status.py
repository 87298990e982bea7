"""`diffcascade status NAME --namespace NS`: the plan of a cascade on a cluster, from its status."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from diffcascade_operator.spec import API_GROUP, API_VERSION, PLURAL


class ClusterStatusError(RuntimeError):
    """The resource cannot be read; the message says why (no kubeconfig, not found, ...)."""


def read_cascade(name: str, namespace: str, *, context: str | None = None) -> dict[str, Any]:
    """The DiffusionCascade object (kubeconfig, else in-cluster config)."""
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException

    # The client reads $KUBECONFIG once, at import; read it now so the current value counts.
    kubeconfig = os.environ.get("KUBECONFIG") or None
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context
        )
    except (ConfigException, OSError, TypeError):
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except ConfigException as exc:
            raise ClusterStatusError(
                f"no Kubernetes configuration found ({exc}): point KUBECONFIG at one (or pass "
                "--context); for a run on this machine, start `diffcascade up` and run "
                "`diffcascade status` without --cluster/--namespace"
            ) from None
    api = client.CustomObjectsApi()
    try:
        obj = api.get_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name, _request_timeout=10
        )
    except ApiException as exc:
        if exc.status == 404:
            raise ClusterStatusError(
                f"no DiffusionCascade {name!r} in namespace {namespace!r} "
                "(`kubectl get dcas -A` lists them)"
            ) from None
        raise ClusterStatusError(f"reading {namespace}/{name}: {exc.status} {exc.reason}") from None
    except Exception as exc:  # connection refused, DNS, TLS: urllib3's errors
        raise ClusterStatusError(
            f"cannot reach the cluster: {exc} (check `kubectl cluster-info`, or --context)"
        ) from None
    if not isinstance(obj, dict):
        raise ClusterStatusError(f"unexpected answer for {namespace}/{name}: {type(obj).__name__}")
    return obj


def _num(value: Any, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)


def profiles_lines(doc: dict[str, Any] | None) -> list[str]:
    """`status.profiles` (or a local run's `profiles`) as one line per gated stage."""
    if not doc:
        return []
    lines = []
    drifted = doc.get("drift")
    verdict = "DRIFT" if drifted else ("within profile" if drifted is False else "not judged")
    for v in doc.get("variants") or []:
        latency = f"latency {v.get('latencySource', '-')} ({v.get('batches', 0)} batches)"
        if v.get("fProfile") is None and v.get("maxDistance") is None:
            lines.append(f"{v.get('name')}: {latency}")
            continue
        lines.append(
            f"{v.get('name')}: {v.get('samples', 0)} samples in "
            f"{_num(doc.get('windowSeconds'), '.0f')} s ({doc.get('source', '-')}); "
            f"f({_num(v.get('threshold'), '.3f')}) live "
            f"{_num(v.get('fLive'))} profile {_num(v.get('fProfile'))} planned "
            f"{_num(v.get('fPlanned'))} (live weight {_num(v.get('weight'))}); max distance "
            f"{_num(v.get('maxDistance'), '.3f')} vs {_num(doc.get('driftDistance'), '.2f')}: "
            f"{verdict}; {latency}"
        )
    return lines


def source_text(source: Any) -> str:
    """Where demand came from; `no metrics` rather than `None` when nothing answered."""
    return "no metrics" if source in (None, "", "None") else str(source)


def slo_line(doc: dict[str, Any] | None) -> str | None:
    """`status.slo` (or a local run's `slo`) as one line: the verdict, then the numbers."""
    if not doc:
        return None
    return f"{slo_verdict(doc)}: {doc.get('message') or '-'}"


def slo_verdict(doc: dict[str, Any]) -> str:
    met = doc.get("met")
    return "met" if met is True else "MISSED" if met is False else "not judged"


def render_cluster_status(obj: dict[str, Any]) -> RenderableType:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    demand = status.get("demand") or {}
    alloc = status.get("allocation") or {}
    solver = alloc.get("solver") or {}
    head = Text.assemble(
        ("DiffusionCascade ", "bold"),
        (f"{meta.get('namespace', '?')}/{meta.get('name', '?')}", "bold cyan"),
    )
    if not status:
        return Group(head, Text("no status yet (is the operator running?)", style="yellow"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    grid.add_row(
        "demand",
        f"{_num(demand.get('qps'))} qps planned, {_num(demand.get('measuredQps'))} measured "
        f"({source_text(demand.get('source'))})",
    )
    pair = str(alloc.get("pair", "-"))
    row = alloc.get("row")
    if isinstance(row, dict):
        pair += (
            f"  (table row r={row.get('routerShare')} c={row.get('escalateShare')}: "
            f"FID {row.get('fid')})"
        )
    grid.add_row(
        "pair",
        f"{pair}  entry {alloc.get('entryStage', '-')}, router share "
        f"{_num(alloc.get('routerShare'))}",
    )
    grid.add_row(
        "threshold",
        f"{_num(alloc.get('threshold'), '.3f')}  defer {_num(alloc.get('deferFraction'), '.0%')}"
        f"  predicted FID {_num(alloc.get('predictedFID'))}",
    )
    grid.add_row(
        "solver",
        f"{solver.get('status', '-')} in {_num(solver.get('solveMillis'), '.0f')} ms, "
        f"decided {alloc.get('decidedAt', '-')}",
    )
    grid.add_row("reason", str(alloc.get("reason") or "-"))
    slo = slo_line(status.get("slo"))
    if slo is not None:
        grid.add_row("SLO", Text(slo, style="red" if "MISSED" in slo[:6] else ""))
    for line in profiles_lines(status.get("profiles")):
        grid.add_row("profiles", line)
    table = Table(show_edge=False, header_style="bold")
    for column in ("variant", "ready/desired", "batch", "threshold"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for variant in alloc.get("variants") or []:
        table.add_row(
            str(variant.get("name")),
            f"{variant.get('readyReplicas', '-')}/{variant.get('replicas', '-')}",
            _num(variant.get("batchSize"), "d"),
            _num(variant.get("threshold"), ".3f"),
        )
    conditions = Table(show_edge=False, header_style="bold")
    for column in ("condition", "status", "reason"):
        conditions.add_column(column, no_wrap=True)
    conditions.add_column("message")  # whole, wrapped at spaces: never cut mid-word
    for cond in status.get("conditions") or []:
        conditions.add_row(
            str(cond.get("type")),
            str(cond.get("status")),
            str(cond.get("reason", "")),
            str(cond.get("message", "")),
        )
    return Group(head, grid, table, conditions)
