"""Several GPU hosts on Ray (the `fleet` extra): each host's daemon judges its own VRAM, Ray
gives membership, failure detection, pinning and execution.

- `members`: the hosts, from Ray's node list (labels `fleet-host`, `gpum-port`)
- `placement`: pure: the host chosen from every host's dry run
- `runner`: asks, chooses, acts; `api`: the /fleet routes every daemon serves
- `tasks`: `remote(vram_mb=...)`: Ray tasks and actors placed where the VRAM is, holding a
  lease on that host while they run (imports Ray: only `from gpu_manager.fleet import remote`
  loads it)
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Ray is loaded only by those who use it (the daemon's start does not).
    if name in ("remote", "PlacementRefused", "FleetPlacementError"):
        from gpu_manager.fleet import tasks  # noqa: PLC0415

        return getattr(tasks, name)
    raise AttributeError(name)
