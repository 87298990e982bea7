"""`diffcascade-worker serve`: one variant behind the worker API.

The HTTP server comes up at once (so liveness probes pass) and the model loads and warms up
in the background; `/readyz` turns 200 when it is done. On SIGTERM or SIGINT the worker turns
not-ready, refuses new generations with 503, lets accepted ones finish (up to the drain
timeout), then exits 0. Images still unfinished at the drain timeout are refused with a 503 in
the OpenAI error envelope, logged, and the exit code is `EXIT_DRAIN_INCOMPLETE`. A second
signal exits at once.

Without a config token the worker does not start, unless `--insecure-no-token` says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import click
import uvicorn
from pydantic import SecretStr, ValidationError

from diffcascade_worker.models.assembly import assembly_from_options, assembly_options
from diffcascade_worker.protocol import EXIT_DRAIN_INCOMPLETE
from diffcascade_worker.serving import settings as defaults
from diffcascade_worker.serving.api_keys import ApiKeyError, read_keys
from diffcascade_worker.serving.limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_WRITE_TIMEOUT_S,
    BodyLimit,
    guarded_protocol,
    raise_file_limit,
)
from diffcascade_worker.serving.settings import WorkerSettings

logger = logging.getLogger("diffcascade_worker")

_ENV = "DIFFCASCADE_"
_FLAG_OF = {
    "forward_timeout_s": "forward_timeout",
    "drain_timeout_s": "drain_timeout",
    "allowed_next_stages": "allowed_next_stage",
    "header_timeout_s": "header_timeout",
    "keep_alive_s": "keep_alive_timeout",
    "write_timeout_s": "write_timeout",
}


class DrainingServer(uvicorn.Server):
    """uvicorn, but a signal drains the service before the server stops."""

    def __init__(self, config: uvicorn.Config, *, service: Any) -> None:
        super().__init__(config)
        self._service = service
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None
        self.exit_code = 0

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's handler, the signal is not re-raised after shutdown: a drained
        # worker exits 0.
        if self._loop is None or self._draining is not None or self.should_exit:
            self.should_exit = True
            self.force_exit = self._draining is not None
            return
        logger.info("%s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain(), name="drain")

    async def _drain(self) -> None:
        if await self._service.drain():
            self.exit_code = EXIT_DRAIN_INCOMPLETE
        self.should_exit = True

    def fail(self, message: str) -> None:
        self.exit_code = 1
        self.should_exit = True


def server_config(service: Any, *, log_level: str = "info", access_log: bool = False) -> Any:
    """The uvicorn config of a worker: its app behind the body limit and connection guards."""
    from diffcascade_worker.serving.app import create_app

    settings: WorkerSettings = service.settings
    config = uvicorn.Config(
        BodyLimit(create_app(service), max_bytes=settings.max_body_bytes),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        timeout_keep_alive=settings.keep_alive_s,
    )
    config.load()
    config.http_protocol_class = guarded_protocol(
        config.http_protocol_class,
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
        write_timeout_s=settings.write_timeout_s,
    )
    return config


def _problems(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        if e["loc"]:
            flag = _FLAG_OF.get(str(e["loc"][0]), str(e["loc"][0])).replace("_", "-")
            parts.append(f"--{flag}: {e['msg']}")
        else:
            parts.append(str(e["msg"]).removeprefix("Value error, "))
    return "; ".join(parts)


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads; a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {os.strerror(error.errno) if error.errno else error} "
            "(another process uses it? pick another --port)"
        ) from None


def _option_env(name: str) -> str:
    return _ENV + name.upper().replace("-", "_")


def _secret(token: str | None) -> SecretStr | None:
    return None if token is None else SecretStr(token)


def read_token(token: str | None, token_file: Path | None) -> str | None:
    """--token-file wins over --token / DIFFCASCADE_TOKEN; a blank token means none."""
    if token_file is not None:
        try:
            return token_file.read_text(encoding="utf-8").strip() or None
        except OSError as error:
            raise click.UsageError(f"cannot read --token-file {token_file}: {error}") from None
    return token


@click.command("serve")
@click.option(
    "--model",
    required=True,
    envvar=_option_env("model"),
    help="diffusers folder or hub id of this variant",
)
@click.option(
    "--variant",
    required=True,
    envvar=_option_env("variant"),
    help="name of this stage (the `variant` metric label, `served_by`)",
)
@click.option(
    "--cascade",
    default="default",
    show_default=True,
    envvar=_option_env("cascade"),
    help="cascade name (the `cascade` metric label)",
)
@click.option("--host", default="127.0.0.1", show_default=True, envvar=_option_env("host"))
@click.option(
    "--port", type=int, default=defaults.DEFAULT_PORT, show_default=True, envvar=_option_env("port")
)
@click.option(
    "--steps",
    type=int,
    default=None,
    envvar=_option_env("steps"),
    help="denoising steps [default: the model folder's, else 1]",
)
@click.option(
    "--guidance",
    type=float,
    default=None,
    envvar=_option_env("guidance"),
    help="classifier-free guidance scale [default: the model folder's, else 0]",
)
@click.option(
    "--size",
    type=int,
    default=None,
    envvar=_option_env("size"),
    help="square image side in px [default: the model folder's, else 512]",
)
@click.option(
    "--batch-size", type=int, default=1, show_default=True, envvar=_option_env("batch_size")
)
@click.option(
    "--max-batch-wait-ms",
    type=float,
    default=0.0,
    show_default=True,
    envvar=_option_env("max_batch_wait_ms"),
    help="wait this long for a fuller batch (0: take what is queued)",
)
@click.option(
    "--threshold",
    type=float,
    default=0.0,
    show_default=True,
    envvar=_option_env("threshold"),
    help="defer images whose gate confidence is below this",
)
@click.option(
    "--gate",
    "gate_path",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    envvar=_option_env("gate"),
    help="discriminator checkpoint, or a CLIP model folder (the clip-score gate)",
)
@click.option(
    "--next-stage-url",
    default=None,
    envvar=_option_env("next_stage_url"),
    help="base URL of the next stage (no URL: never defer)",
)
@click.option(
    "--token",
    default=None,
    envvar=_option_env("token"),
    help="bearer token for the config API (env DIFFCASCADE_TOKEN)",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar=_option_env("token_file"),
    help="read the token from a file",
)
@click.option(
    "--api-keys",
    "api_keys",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    envvar=_option_env("api_keys"),
    help="client API keys: a file with one key per line, or a folder of such files (a mounted "
    "Secret); generation then needs 'Authorization: Bearer <key>' [default: open]",
)
@click.option(
    "--slo-seconds",
    type=float,
    default=5.0,
    show_default=True,
    envvar=_option_env("slo_seconds"),
    help="default deadline of a request",
)
@click.option(
    "--queue-capacity",
    type=int,
    default=defaults.DEFAULT_QUEUE_CAPACITY,
    show_default=True,
    envvar=_option_env("queue_capacity"),
    help="images that may wait; beyond it requests get 429",
)
@click.option(
    "--forward-timeout",
    type=float,
    default=30.0,
    show_default=True,
    envvar=_option_env("forward_timeout"),
    help="seconds a deferral may take at most",
)
@click.option(
    "--drain-timeout",
    type=float,
    default=30.0,
    show_default=True,
    envvar=_option_env("drain_timeout"),
    help="seconds to finish accepted requests",
)
@click.option("--device", default=None, envvar=_option_env("device"), help="cpu, cuda, cuda:1 ...")
@click.option("--dtype", default=None, envvar=_option_env("dtype"), help="float32, float16 ...")
@assembly_options(envvar_prefix=_ENV)
@click.option(
    "--threads",
    type=int,
    default=None,
    envvar=_option_env("threads"),
    help="torch CPU threads [default: torch's]",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--allowed-next-stage",
    "allowed_next_stages",
    multiple=True,
    envvar=_option_env("allowed_next_stages"),
    help="a next-stage base URL a config push may set (repeatable; env: space-separated; "
    "port * = any port); --next-stage-url is always allowed, nothing else is",
)
@click.option(
    "--insecure-no-token",
    is_flag=True,
    default=False,
    envvar=_option_env("insecure_no_token"),
    help="start without a config token: anyone who reaches the port may change the config",
)
@click.option(
    "--max-body-bytes",
    type=int,
    default=DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    envvar=_option_env("max_body_bytes"),
    help="larger request bodies get 413",
)
@click.option(
    "--max-connections",
    type=int,
    default=DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    envvar=_option_env("max_connections"),
    help="open connections; beyond it the longest-idle one is closed",
)
@click.option(
    "--header-timeout",
    type=float,
    default=DEFAULT_HEADER_TIMEOUT_S,
    show_default=True,
    envvar=_option_env("header_timeout"),
    help="seconds a connection has to send its request headers",
)
@click.option(
    "--keep-alive-timeout",
    type=int,
    default=DEFAULT_KEEP_ALIVE_S,
    show_default=True,
    envvar=_option_env("keep_alive_timeout"),
    help="seconds an idle keep-alive connection stays open",
)
@click.option(
    "--write-timeout",
    type=float,
    default=DEFAULT_WRITE_TIMEOUT_S,
    show_default=True,
    envvar=_option_env("write_timeout"),
    help="seconds a response may wait on a client that reads nothing before the connection "
    "is dropped",
)
@click.option("--access-log/--no-access-log", default=False, show_default=True)
def serve(
    *,
    model: str,
    variant: str,
    cascade: str,
    host: str,
    port: int,
    steps: int | None,
    guidance: float | None,
    size: int | None,
    batch_size: int,
    max_batch_wait_ms: float,
    threshold: float,
    gate_path: Path | None,
    next_stage_url: str | None,
    token: str | None,
    token_file: Path | None,
    api_keys: Path | None,
    slo_seconds: float,
    queue_capacity: int,
    forward_timeout: float,
    drain_timeout: float,
    device: str | None,
    dtype: str | None,
    unet: str | None,
    weights_variant: str | None,
    safety_checker: bool | None,
    scheduler: str | None,
    scheduler_config: str | None,
    threads: int | None,
    log_level: str,
    access_log: bool,
    allowed_next_stages: tuple[str, ...],
    insecure_no_token: bool,
    max_body_bytes: int,
    max_connections: int,
    header_timeout: float,
    keep_alive_timeout: int,
    write_timeout: float,
) -> None:
    """Serve one model variant: images API, gate, deferral, metrics.

    Every flag may also come from the environment as DIFFCASCADE_<FLAG>, e.g.
    DIFFCASCADE_NEXT_STAGE_URL or DIFFCASCADE_TOKEN.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per deferral otherwise
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise click.UsageError(f"--model {model}: no such folder")
    assembly = assembly_from_options(
        unet=unet,
        scheduler=scheduler,
        scheduler_config=scheduler_config,
        weights_variant=weights_variant,
        safety_checker=safety_checker,
    )
    try:
        settings = WorkerSettings(
            model=model,
            variant=variant,
            cascade=cascade,
            host=host,
            port=port,
            steps=steps,
            guidance=guidance,
            size=size,
            device=device,
            dtype=dtype,
            assembly=assembly,
            threads=threads,
            batch_size=batch_size,
            max_batch_wait_ms=max_batch_wait_ms,
            threshold=threshold,
            gate=gate_path,
            next_stage_url=next_stage_url,
            token=_secret(read_token(token, token_file)),
            api_keys=api_keys,
            slo_seconds=slo_seconds,
            queue_capacity=queue_capacity,
            forward_timeout_s=forward_timeout,
            drain_timeout_s=drain_timeout,
            allowed_next_stages=tuple(
                url for entry in allowed_next_stages for url in entry.split()
            ),
            insecure_no_token=insecure_no_token,
            max_body_bytes=max_body_bytes,
            max_connections=max_connections,
            header_timeout_s=header_timeout,
            keep_alive_s=keep_alive_timeout,
            write_timeout_s=write_timeout,
        )
    except ValidationError as error:
        raise click.UsageError(_problems(error)) from None
    if settings.token is None and not settings.insecure_no_token:
        raise click.UsageError(
            "no config token: give --token, --token-file or DIFFCASCADE_TOKEN "
            "(or --insecure-no-token to let anyone change the config)"
        )
    if settings.token is None:
        logger.warning("--insecure-no-token: the config API accepts unauthenticated changes")
    if settings.api_keys is not None:
        try:
            read_keys(settings.api_keys)
        except ApiKeyError as error:
            raise click.UsageError(f"--api-keys: {error}") from None
    raise_file_limit()
    listening = _listen(settings.host, settings.port)  # a busy port fails here, at once

    from diffcascade_worker.serving.service import WorkerService

    try:
        service = WorkerService(settings)
    except ApiKeyError as error:  # the files changed since they were checked above
        raise click.UsageError(f"--api-keys: {error}") from None
    except ValueError as error:
        raise click.UsageError(f"--next-stage-url: {error}") from None
    server = DrainingServer(
        server_config(service, log_level=log_level, access_log=access_log), service=service
    )
    service.on_fatal = server.fail
    server.run(sockets=[listening])
    if server.exit_code == EXIT_DRAIN_INCOMPLETE:
        click.echo(
            f"Error: the drain timeout passed with {service.refused_at_drain} accepted image(s) "
            "unfinished; they were refused with 503",
            err=True,
        )
    elif server.exit_code:
        click.echo(f"Error: {service.health().detail or 'the worker failed'}", err=True)
    # Everything accepted has been answered. Interpreter teardown of torch and friends takes
    # seconds here, which only delays the pod's exit, so leave at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(server.exit_code)
