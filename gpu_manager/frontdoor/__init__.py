"""The front door: OpenAI-compatible `/v1` and the `/svc/<name>` reverse proxy, on the
daemon's own port; requests start, wake and (when idle by measure) release services."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from gpu_manager.frontdoor.asgi import FrontDoorApp, proxied
from gpu_manager.frontdoor.door import FrontDoor
from gpu_manager.frontdoor.idle import IdleWatch
from gpu_manager.frontdoor.stats import DoorStats, GateCollector

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gpu_manager.daemon import Daemon
    from gpu_manager.settings import Settings


def install(app: FastAPI, daemon: Daemon, settings: Settings,
            registry: CollectorRegistry) -> FrontDoor:
    """Put the front door before the API's routes (call before the security middleware is
    added, so that it runs inside it: Host and Origin checks apply here too)."""
    door = FrontDoor(daemon, DoorStats(registry))
    door.idle = IdleWatch(door)
    registry.register(GateCollector(lambda: {
        n: (len(g.in_flight), g.waiting) for n, g in door.gates.items()}))
    app.add_middleware(FrontDoorApp, door=door, token=settings.token_value(),
                       max_body=settings.proxy_max_body_bytes)
    daemon.door = door
    return door


def serve_status(door: FrontDoor | None, name: str) -> dict[str, Any] | None:
    """A served service's front-door figures for `/gpu/status`; None when it is not served."""
    cfg = None if door is None else door.serve_of(name)
    if door is None or cfg is None:
        return None
    gate = door.gates.get(name)
    now = time.monotonic()
    idle: dict[str, Any] | None = None
    if cfg.idle is not None:
        st = door.idle.state.get(name) if door.idle is not None else None
        quiet = door.idle.idle_for(name, now) if door.idle is not None else None
        idle = {"after_s": cfg.idle.after_s, "below_util_pct": cfg.idle.below_util_pct,
                "then": cfg.idle.then, "idle_for_s": None if quiet is None else round(quiet, 1),
                "util_pct": st.util_pct if st else None,
                "util_source": st.source if st else "none",
                "releasing": bool(st and st.releasing)}
    return {
        "url": cfg.url, "models": list(cfg.models), "max_concurrent": cfg.max_concurrent,
        "in_flight": len(gate.in_flight) if gate else 0,
        "waiting": gate.waiting if gate else 0, "queue_max": cfg.queue.max,
        "draining": bool(gate and gate.holds),
        "last_request_at": gate.last_request_at if gate else None,
        "request_starts": gate.starts if gate else 0,
        "cut": gate.cut if gate else 0,
        "idle": idle,
    }


__all__ = ["DoorStats", "FrontDoor", "FrontDoorApp", "IdleWatch", "install", "proxied",
           "serve_status"]
