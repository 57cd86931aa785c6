"""The Typer app and what every command shares."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="gpu-manager",
    help="Coordinate GPU-hungry services on one GPU host.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
