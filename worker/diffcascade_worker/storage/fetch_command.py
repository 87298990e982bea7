"""`diffcascade-worker fetch`: the init container that fills a pod's model cache.

Torch-free and quick to start: it only downloads. Each URI's local path is printed, one per
line, in the order given; the operator renders the same paths into the serving container.
`--model` names the pipeline and, with the assembly flags the worker is started with
(`--unet`, `--weights-variant`, `--safety-checker`), only the files that worker will load of
it are downloaded; other URIs (a gate, a curve file) are fetched whole.
"""

from __future__ import annotations

from pathlib import Path

import click

from diffcascade_worker.models.assembly import assembly_from_options, assembly_options
from diffcascade_worker.storage.pipeline_files import PipelineSelection
from diffcascade_worker.storage.uris import (
    CACHE_MOUNT,
    Credentials,
    StorageError,
    StorageUri,
    fetch,
    parse_uri,
)


def plan_fetch(
    uris: tuple[str, ...] | list[str],
    *,
    model: str | None,
    unet: str | None = None,
    weights_variant: str | None = None,
    safety_checker: bool | None = None,
) -> list[tuple[StorageUri, PipelineSelection | None]]:
    """What `fetch` downloads, in order: the pipeline with what its worker loads of it, the
    replacement UNet (its variant's weights if it is a folder), then the other URIs whole."""
    assembly = assembly_from_options(
        unet=unet, weights_variant=weights_variant, safety_checker=safety_checker
    )
    wanted: list[tuple[str, PipelineSelection | None]] = []
    if model is not None:
        pipeline = PipelineSelection(
            weights_variant=assembly.weights_variant,
            safety_checker=assembly.runs_safety_checker,
            replaced_denoiser=assembly.unet is not None,
        )
        wanted.append((model, pipeline))
    if assembly.unet is not None:
        wanted.append((assembly.unet, PipelineSelection(weights_variant=assembly.weights_variant)))
    wanted += [(uri, None) for uri in uris]
    if not wanted:
        raise click.UsageError("nothing to fetch: give --model, --unet or URIs")
    try:
        return [(parse_uri(uri, bare_hub_ids=True), selection) for uri, selection in wanted]
    except StorageError as error:
        raise click.UsageError(str(error)) from None


@click.command("fetch")
@click.argument("uris", nargs=-1)
@click.option(
    "--model",
    default=None,
    help="the variant's pipeline (storage URI): only the files the worker loads are fetched",
)
@assembly_options(fetch=True)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=CACHE_MOUNT,
    show_default=True,
    envvar="DIFFCASCADE_CACHE_DIR",
    help="the model cache (a PVC or an emptyDir shared with the serving container)",
)
@click.option(
    "--s3-endpoint",
    default=None,
    envvar="AWS_ENDPOINT_URL",
    help="S3-compatible endpoint, e.g. http://minio.storage:9000 [default: AWS]",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, show_default=True)
def fetch_command(
    *,
    uris: tuple[str, ...],
    model: str | None,
    unet: str | None,
    weights_variant: str | None,
    safety_checker: bool | None,
    cache_dir: Path,
    s3_endpoint: str | None,
    timeout: float,
) -> None:
    """Fetch model, gate and curve URIs (hf://, pvc://, http(s)://, s3://, paths) into the cache.

    Credentials come from the environment: HF_TOKEN for gated hub models,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_REGION) for S3.
    """
    parsed = plan_fetch(
        uris,
        model=model,
        unet=unet,
        weights_variant=weights_variant,
        safety_checker=safety_checker,
    )
    credentials = Credentials.from_env()
    if s3_endpoint:
        credentials = Credentials(**{**credentials.__dict__, "s3_endpoint": s3_endpoint})
    cache_dir.mkdir(parents=True, exist_ok=True)
    for uri, selection in parsed:
        report: list[str] = []
        try:
            path = fetch(
                uri,
                cache_dir=cache_dir,
                credentials=credentials,
                timeout_s=timeout,
                selection=selection,
                report=report,
            )
        except StorageError as error:
            raise click.ClickException(str(error)) from None
        for line in report:
            click.echo(line, err=True)
        click.echo(f"{uri.raw} -> {path}")
