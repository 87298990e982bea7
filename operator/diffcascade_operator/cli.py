"""`diffcascade`: one entry point; each subcommand lives with the code it drives.

Subcommands are imported on first use so `diffcascade simulate` never imports Kopf and the
operator never imports the simulator's plotting stack.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

_COMMANDS = {
    "simulate": "diffcascade_operator.sim.cli:simulate",
    "operator": "diffcascade_operator.kube.cli:operator_command",
    "up": "diffcascade_operator.local.cli:up",
    "status": "diffcascade_operator.local.cli:status",
    "demo": "diffcascade_operator.local.cli:demo",
    "load": "diffcascade_operator.loadgen.cli:load",
    "render": "diffcascade_operator.kube.render:render",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command: Any = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup)
@click.version_option(package_name="diffcascade")
def main() -> None:
    """Query-aware diffusion cascades: simulate, run locally, or operate on Kubernetes."""
