"""Swapping the inventory through its owners (a reload): removed services are stopped
through their units (a failed stop keeps the unit, still counted, and says so), changed ones
are reconfigured through their inbox, added ones are built by the same factory as at
start-up. The caller holds the orchestrator's transition lock, so no transition ever sees
half an inventory; this module is the only writer of the view's inventory and units."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from loguru import logger

from gpu_manager.config import Inventory, ServiceConfig
from gpu_manager.orchestrator.view import GpuView
from gpu_manager.planner import PlannerInventory
from gpu_manager.units import Driver, Unit


class UnitFactory(Protocol):
    """How the daemon builds units and drivers (one place, for start-up and reloads)."""

    def unit(self, name: str, cfg: ServiceConfig) -> Unit: ...

    def driver(self, name: str, cfg: ServiceConfig) -> Driver: ...


@dataclass
class ReloadResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    # removed services whose stop failed: still running, still counted, retried next reload
    kept: dict[str, str] = field(default_factory=dict)


async def apply_inventory(orch: GpuView, new: Inventory, make: UnitFactory) -> ReloadResult:
    """Swap in a new inventory (the caller holds the transition lock): removed services are
    stopped through their units (a failed stop keeps the unit, still counted, and says so),
    changed ones are reconfigured through their inbox, added ones are built by the same
    factory as at start-up."""
    res = ReloadResult()
    old = orch.inventory
    for name in [n for n in orch.units if n not in new.services]:
        unit = orch.units[name]
        stopped = await unit.stop("removed from the inventory")
        if not stopped.ok:
            res.kept[name] = stopped.reason
            logger.error(f"{name}: removed from the inventory but its stop failed "
                         f"({stopped.reason}); still counted, retried at the next "
                         "reload")
            continue
        del orch.units[name]
        await unit.close()
        orch.ledger.forget(name)
        res.removed.append(name)
    for name, cfg in new.services.items():
        if name not in orch.units:
            unit = make.unit(name, cfg)
            unit.start_loop()
            orch.units[name] = unit
            res.added.append(name)
        elif cfg != old.services.get(name):
            unit = orch.units[name]
            done = await unit.reconfigure(cfg, make.driver(name, cfg))
            if not done.ok:
                logger.error(f"{name}: its new definition was not taken: {done.reason}")
                res.kept[name] = f"changed, but not applied: {done.reason}"
                continue
            res.changed.append(name)
            if unit.driver.running() and cfg.on_change == "restart":
                res.restart.append(name)
    # The gpu: section takes a restart (the probe and the cards were made from it): keep
    # the running one, so `several` and the managed cards never change under the plans.
    new = dataclasses.replace(new, gpu=old.gpu)
    orch.inventory = new
    orch.pinv = PlannerInventory.from_inventory(new)
    return res
