"""The front door: OpenAI-compatible `/v1` and the `/svc/<name>` reverse proxy, on the
daemon's own port; requests start, wake and (when idle by measure) release services."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from gpu_manager.api.security import Policy
from gpu_manager.frontdoor.asgi import FrontDoorApp, proxied
from gpu_manager.frontdoor.door import FrontDoor
from gpu_manager.frontdoor.idle import IdleWatch
from gpu_manager.frontdoor.stats import DoorStats, GateCollector

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gpu_manager.frontdoor.host import Host
    from gpu_manager.settings import Settings


def install(app: FastAPI, daemon: Host, settings: Settings,
            registry: CollectorRegistry) -> FrontDoor:
    """Put the front door before the API's routes (call before the security middleware is
    added, so that it runs inside it: Host and Origin checks apply here too)."""
    door = FrontDoor(daemon, DoorStats(registry))
    door.idle = IdleWatch(door)
    registry.register(GateCollector(lambda: {
        n: (len(g.in_flight), g.waiting) for n, g in door.gates.items()}))
    policy = Policy.from_settings(settings)
    app.add_middleware(FrontDoorApp, door=door, token=settings.token_value(),
                       max_body=settings.proxy_max_body_bytes, foreign=policy.cross_origin)
    return door


__all__ = ["DoorStats", "FrontDoor", "FrontDoorApp", "IdleWatch", "install", "proxied"]
