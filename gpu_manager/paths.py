"""Where the daemon keeps its state; one place so the daemon, the CLI and stand-ins agree."""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "GPU_MANAGER_STATE_DIR"
SIM_DIR_ENV = "GPU_MANAGER_SIM_DIR"


def state_dir() -> Path:
    """`$GPU_MANAGER_STATE_DIR`, else `$XDG_STATE_HOME/gpu-manager`, else ~/.local/state/..."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "gpu-manager"


def sim_dir(state: Path | None = None) -> Path:
    """The simulated GPU's registry: `$GPU_MANAGER_SIM_DIR`, else `<state dir>/sim`."""
    if state is None:
        explicit = os.environ.get(SIM_DIR_ENV)
        if explicit:
            return Path(explicit)
        state = state_dir()
    return state / "sim"
