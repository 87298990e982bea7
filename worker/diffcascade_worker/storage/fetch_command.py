"""`diffcascade-worker fetch`: the init container that fills a pod's model cache.

Torch-free and quick to start: it only downloads. Each URI's local path is printed, one per
line, in the order given; the operator renders the same paths into the serving container.
"""

from __future__ import annotations

from pathlib import Path

import click

from diffcascade_worker.storage.uris import CACHE_MOUNT, Credentials, StorageError, fetch, parse_uri


@click.command("fetch")
@click.argument("uris", nargs=-1, required=True)
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
    uris: tuple[str, ...], cache_dir: Path, s3_endpoint: str | None, timeout: float
) -> None:
    """Fetch model, gate and curve URIs (hf://, pvc://, http(s)://, s3://, paths) into the cache.

    Credentials come from the environment: HF_TOKEN for gated hub models,
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_REGION) for S3.
    """
    try:
        parsed = [parse_uri(u, bare_hub_ids=True) for u in uris]
    except StorageError as error:
        raise click.UsageError(str(error)) from None
    credentials = Credentials.from_env()
    if s3_endpoint:
        credentials = Credentials(**{**credentials.__dict__, "s3_endpoint": s3_endpoint})
    cache_dir.mkdir(parents=True, exist_ok=True)
    for uri in parsed:
        try:
            path = fetch(uri, cache_dir=cache_dir, credentials=credentials, timeout_s=timeout)
        except StorageError as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"{uri.raw} -> {path}")
