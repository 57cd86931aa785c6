"""The `gpu-manager` command line: local commands, client verbs and `serve`."""

from gpu_manager.cli import client, local, serve  # noqa: F401 - they register commands
from gpu_manager.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
