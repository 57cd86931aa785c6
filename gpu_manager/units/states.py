"""Service states and their groups; no dependencies (the supervisor `states.py` habit)."""

from __future__ import annotations

from enum import StrEnum


class ServiceState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    FAILED = "failed"


# States in which the service may hold VRAM: the planner counts these as running.
HOLDS_GPU = frozenset({ServiceState.STARTING, ServiceState.READY, ServiceState.UNHEALTHY,
                       ServiceState.STOPPING})
# States with a live process/container the unit is responsible for.
RUNNING = frozenset({ServiceState.STARTING, ServiceState.READY, ServiceState.UNHEALTHY})
