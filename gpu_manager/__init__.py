"""gpu-manager: a GPU coordinator daemon for one GPU host.

The names of the legacy `gpu_manager.py` module (`get_gpu_manager`, `GPUManager`, v2's
`get_gpu_manager_v2`, ...) are served from here too, so old code that does
`import gpu_manager; gpu_manager.get_gpu_manager()` keeps working once this package replaces
the old file. They live in `gpu_manager.legacy` (the same file as compat/gpu_manager.py).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

LEGACY_NAMES = frozenset({"GPUManager", "GPUManagerV2", "get_gpu_manager", "get_gpu_manager_v2"})


def __getattr__(name: str) -> Any:
    if name in LEGACY_NAMES:
        from gpu_manager import legacy  # noqa: PLC0415 - only old callers pay for it

        return getattr(legacy, name)
    raise AttributeError(f"module 'gpu_manager' has no attribute {name!r}")
