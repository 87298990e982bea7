"""`diffcascade-worker route`: the pre-generation router in front of a cascade's stages.

Torch-free: the operator image runs it (the cascade's `<cascade>` Service points at it) and
`diffcascade up` can too. It serves the same OpenAI images endpoint as the workers, behind the
same armour (body limit, header timeout, connection limit) and, with `--api-keys`, checks the
same client API keys (the cascade's one door: a prompt sent straight to the heavy stage is
checked like any other); the control plane sets the plan with an authenticated PUT of
`/v1/cascade/router`. SIGTERM: not ready, finish what was accepted (up to the drain
timeout), exit.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import uvicorn
from pydantic import SecretStr, ValidationError

from diffcascade_worker.protocol import EXIT_DRAIN_INCOMPLETE, RouterConfig
from diffcascade_worker.routing.service import (
    DEFAULT_MAX_INFLIGHT,
    DEFAULT_ROUTER_PORT,
    RouterService,
    RouterSettings,
)
from diffcascade_worker.serving.api_keys import ApiKeyError, read_keys
from diffcascade_worker.serving.limits import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    BodyLimit,
    guarded_protocol,
)
from diffcascade_worker.serving.serve_command import DrainingServer, _listen, read_token

logger = logging.getLogger("diffcascade_worker.routing")
_ENV = "DIFFCASCADE_"


def _env(name: str) -> str:
    return _ENV + name.upper().replace("-", "_")


def router_server_config(service: RouterService, *, log_level: str = "info") -> uvicorn.Config:
    """The router app behind the workers' body limit and connection guards."""
    from diffcascade_worker.routing.app import create_router_app

    settings = service.settings
    config = uvicorn.Config(
        BodyLimit(create_router_app(service), max_bytes=settings.max_body_bytes),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.drain_timeout_s)),
        timeout_keep_alive=settings.keep_alive_s,
        http="httptools",  # the connection guard below is built and tested on it, not on h11
    )
    config.load()
    config.http_protocol_class = guarded_protocol(
        config.http_protocol_class,
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
    )
    return config


@click.command("route")
@click.option("--cascade", default="default", show_default=True, envvar=_env("cascade"))
@click.option("--host", default="127.0.0.1", show_default=True, envvar=_env("host"))
@click.option(
    "--port", type=int, default=DEFAULT_ROUTER_PORT, show_default=True, envvar=_env("port")
)
@click.option(
    "--entry-url", default=None, envvar=_env("entry_url"), help="the entry stage's base URL"
)
@click.option("--entry-variant", default="entry", show_default=True, envvar=_env("entry_variant"))
@click.option(
    "--heavy-url", default=None, envvar=_env("heavy_url"), help="the heavy stage's base URL"
)
@click.option("--heavy-variant", default=None, envvar=_env("heavy_variant"))
@click.option(
    "--router-share", type=float, default=0.0, show_default=True, envvar=_env("router_share")
)
@click.option(
    "--exploration-share",
    type=float,
    default=0.05,
    show_default=True,
    envvar=_env("exploration_share"),
)
@click.option(
    "--scorer",
    type=click.Choice(["learned", "rule", "none"]),
    default="learned",
    show_default=True,
    envvar=_env("scorer"),
)
@click.option(
    "--allowed-stage",
    "allowed_stages",
    multiple=True,
    envvar=_env("allowed_stages"),
    help="a stage base URL a config push may name (repeatable; env: space-separated; port * = "
    "any port); the initial URLs are always allowed, nothing else is",
)
@click.option("--token", default=None, envvar=_env("token"), help="bearer token of the config API")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    envvar=_env("token_file"),
)
@click.option("--insecure-no-token", is_flag=True, default=False, envvar=_env("insecure_no_token"))
@click.option(
    "--api-keys",
    "api_keys",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    envvar=_env("api_keys"),
    help="client API keys: a file with one key per line, or a folder of such files (a mounted "
    "Secret); generation then needs 'Authorization: Bearer <key>' [default: open]",
)
@click.option(
    "--forward-timeout",
    type=float,
    default=120.0,
    show_default=True,
    envvar=_env("forward_timeout"),
)
@click.option(
    "--drain-timeout", type=float, default=30.0, show_default=True, envvar=_env("drain_timeout")
)
@click.option(
    "--max-inflight",
    type=int,
    default=DEFAULT_MAX_INFLIGHT,
    show_default=True,
    envvar=_env("max_inflight"),
)
@click.option(
    "--max-body-bytes",
    type=int,
    default=DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    envvar=_env("max_body_bytes"),
)
@click.option(
    "--max-connections",
    type=int,
    default=DEFAULT_MAX_CONNECTIONS,
    show_default=True,
    envvar=_env("max_connections"),
)
@click.option(
    "--header-timeout",
    type=float,
    default=DEFAULT_HEADER_TIMEOUT_S,
    show_default=True,
    envvar=_env("header_timeout"),
)
@click.option(
    "--keep-alive-timeout",
    type=int,
    default=DEFAULT_KEEP_ALIVE_S,
    show_default=True,
    envvar=_env("keep_alive_timeout"),
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def route(
    *,
    cascade: str,
    host: str,
    port: int,
    entry_url: str | None,
    entry_variant: str,
    heavy_url: str | None,
    heavy_variant: str | None,
    router_share: float,
    exploration_share: float,
    scorer: str,
    allowed_stages: tuple[str, ...],
    token: str | None,
    token_file: Path | None,
    insecure_no_token: bool,
    api_keys: Path | None,
    forward_timeout: float,
    drain_timeout: float,
    max_inflight: int,
    max_body_bytes: int,
    max_connections: int,
    header_timeout: float,
    keep_alive_timeout: int,
    log_level: str,
) -> None:
    """Route each prompt, before any image is made, to the entry or the heavy stage.

    Without --entry-url the router is not ready until the control plane PUTs a plan.
    """
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        initial = (
            None
            if entry_url is None
            else RouterConfig(
                entry_url=entry_url,
                entry_variant=entry_variant,
                heavy_url=heavy_url or None,  # empty (a ConfigMap key): no heavy stage
                heavy_variant=heavy_variant or None,
                router_share=router_share,
                exploration_share=exploration_share,
                scorer=scorer,  # type: ignore[arg-type]
            )
        )
        secret = read_token(token, token_file)
        settings = RouterSettings(
            cascade=cascade,
            host=host,
            port=port,
            token=None if secret is None else SecretStr(secret),
            insecure_no_token=insecure_no_token,
            api_keys=api_keys,
            initial=initial,
            allowed_stages=tuple(url for entry in allowed_stages for url in entry.split()),
            forward_timeout_s=forward_timeout,
            drain_timeout_s=drain_timeout,
            max_inflight=max_inflight,
            max_body_bytes=max_body_bytes,
            max_connections=max_connections,
            header_timeout_s=header_timeout,
            keep_alive_s=keep_alive_timeout,
        )
    except ValidationError as error:
        problems = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in error.errors())
        raise click.UsageError(problems) from None
    if settings.token is None and not settings.insecure_no_token:
        raise click.UsageError(
            "no config token: give --token, --token-file or DIFFCASCADE_TOKEN "
            "(or --insecure-no-token to let anyone change the plan)"
        )
    if settings.api_keys is not None:
        try:
            read_keys(settings.api_keys)  # no usable keys: stop before binding, as a worker does
        except ApiKeyError as error:
            raise click.UsageError(f"--api-keys: {error}") from None
    listening = _listen(settings.host, settings.port)
    try:
        service = RouterService(settings)
    except ApiKeyError as error:  # the files changed since they were checked above
        raise click.UsageError(f"--api-keys: {error}") from None
    except Exception as error:  # ConfigRejected: an initial URL outside the allowlist
        raise click.UsageError(str(getattr(error, "message", error))) from None
    server = DrainingServer(router_server_config(service, log_level=log_level), service=service)
    server.run(sockets=[listening])
    if server.exit_code == EXIT_DRAIN_INCOMPLETE:
        click.echo("Error: the drain timeout passed with requests unfinished", err=True)
    sys.exit(server.exit_code)
