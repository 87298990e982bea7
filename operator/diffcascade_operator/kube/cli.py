"""`diffcascade operator`: runs the Kopf operator for DiffusionCascade resources.

Every flag has a DIFFCASCADE_* environment variable; flags are copied into the environment
before the handlers module loads, because that is where it reads its settings.
"""

from __future__ import annotations

import importlib
import os

import click

_ENV = "DIFFCASCADE_"


@click.command("operator")
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    envvar=_ENV + "NAMESPACES",
    help="Namespace to serve (repeat for several; env: space-separated). Default: all.",
)
@click.option(
    "-A",
    "--all-namespaces",
    "all_namespaces",
    is_flag=True,
    envvar=_ENV + "ALL_NAMESPACES",
    help="Serve every namespace (the default when no --namespace is given).",
)
@click.option(
    "--standalone/--peering",
    "standalone",
    default=True,
    show_default=True,
    envvar=_ENV + "STANDALONE",
    help="Standalone: no coordination between operator instances (run exactly one). "
    "Peering: coordinate through a KopfPeering object named by --peering-name.",
)
@click.option(
    "--peering-name",
    default="diffcascade",
    show_default=True,
    envvar=_ENV + "PEERING_NAME",
    help="KopfPeering (namespaced) or ClusterKopfPeering (all namespaces) object name.",
)
@click.option(
    "--priority",
    type=int,
    default=0,
    show_default=True,
    envvar=_ENV + "PRIORITY",
    help="Peering priority: the highest-priority instance runs, others pause.",
)
@click.option(
    "--prometheus-url",
    envvar=_ENV + "PROMETHEUS_URL",
    help="Prometheus for cascades without spec.control.prometheusUrl.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    envvar=_ENV + "INTERVAL",
    help="Control interval in seconds for every cascade (default: each spec's).",
)
@click.option(
    "--metrics-window",
    type=click.FloatRange(min=1.0),
    default=60.0,
    show_default=True,
    envvar=_ENV + "METRICS_WINDOW_SECONDS",
    help="PromQL rate window; at least four scrape intervals.",
)
@click.option(
    "--scrape-fallback/--no-scrape-fallback",
    default=True,
    show_default=True,
    envvar=_ENV + "SCRAPE_FALLBACK",
    help="Scrape the worker pods directly when Prometheus cannot be reached.",
)
@click.option(
    "--worker-image",
    envvar=_ENV + "WORKER_IMAGE",
    help="Worker image for variants and cascades that name none.",
)
@click.option(
    "--liveness",
    envvar=_ENV + "LIVENESS",
    help="Serve Kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    envvar=_ENV + "METRICS_PORT",
    help="Serve the control loop's Prometheus series (plans, SLO, drift) on this port.",
)
@click.option("--verbose", "-v", is_flag=True, help="Log Kopf's handler activity.")
@click.option("--debug", is_flag=True, help="Log everything, including API calls.")
def operator_command(
    *,
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    standalone: bool,
    peering_name: str,
    priority: int,
    prometheus_url: str | None,
    interval: float | None,
    metrics_window: float,
    scrape_fallback: bool,
    worker_image: str | None,
    liveness: str | None,
    metrics_port: int | None,
    verbose: bool,
    debug: bool,
) -> None:
    """Run the DiffusionCascade operator (Kopf) until interrupted."""
    import kopf

    namespaces = tuple(n for ns in namespaces for n in ns.split())
    if all_namespaces and namespaces:
        raise click.UsageError("--all-namespaces and --namespace exclude each other")
    env = {
        "PROMETHEUS_URL": prometheus_url,
        "INTERVAL": None if interval is None else str(interval),
        "METRICS_WINDOW_SECONDS": str(metrics_window),
        "SCRAPE_FALLBACK": "true" if scrape_fallback else "false",
        "WORKER_IMAGE": worker_image,
        "METRICS_PORT": None if metrics_port is None else str(metrics_port),
    }
    for key, value in env.items():
        if value is not None:
            os.environ[_ENV + key] = value
    kopf.configure(debug=debug, verbose=verbose or debug)
    importlib.import_module("diffcascade_operator.kube.handlers")
    kopf.run(
        standalone=standalone,
        namespaces=namespaces,
        clusterwide=not namespaces,
        # Naming a peering makes Kopf wait for its CRD, even when standalone.
        peering_name=None if standalone else peering_name,
        priority=None if standalone else priority,
        liveness_endpoint=liveness,
    )
