"""What the front door needs of the daemon that hosts it: a Protocol, so that the front door
does not import the daemon (which holds it) and either side can be built without the other."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gpu_manager.bounds import Bounds
    from gpu_manager.config import Inventory
    from gpu_manager.hooks import Invalidates
    from gpu_manager.orchestrator import Orchestrator
    from gpu_manager.probe import Poller
    from gpu_manager.units import EventBus, Unit


class Host(Protocol):
    @property
    def inventory(self) -> Inventory: ...

    units: dict[str, Unit]
    orchestrator: Orchestrator
    bus: EventBus
    poller: Poller
    bounds: Bounds
    accepting: bool

    @property
    def status_cache(self) -> Invalidates: ...
