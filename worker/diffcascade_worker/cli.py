"""`diffcascade-worker`: serve a variant, route a cascade's prompts, fetch and profile models,
build tiny models, train and calibrate the gate."""

from __future__ import annotations

import importlib
from typing import Any

import click

_COMMANDS = {
    "serve": "diffcascade_worker.serving.serve_command:serve",
    "make-tiny-model": "diffcascade_worker.models.model_commands:make_tiny_model",
    "gate": "diffcascade_worker.models.model_commands:gate",
    "fetch": "diffcascade_worker.storage.fetch_command:fetch_command",
    "profile": "diffcascade_worker.models.profile_command:profile",
    "route": "diffcascade_worker.routing.route_command:route",
}


class _LazyGroup(click.Group):
    """Imports a subcommand's module on first use (torch is slow to import)."""

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
    """The diffcascade worker: one model variant behind an OpenAI-style images API."""


if __name__ == "__main__":
    main()
