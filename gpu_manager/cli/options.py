"""Options shared by commands, in a module of their own: `serve` uses them without loading
the client verbs' output machinery (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigDirOpt = Annotated[
    Path | None,
    typer.Option("--config-dir", "-c", help="Folder with services.yaml and phases.yaml "
                 "[default: $GPU_MANAGER_CONFIG_DIR, else the current folder]"),
]
