"""Hot reload: SIGHUP or a change of services.yaml / phases.yaml swaps the inventory.

The new files are validated first; a bad one keeps the old inventory, is logged and shown in
`/ready`. Services whose definition did not change are not touched. A changed service keeps
running on its old definition until its next start, or is restarted now when it says
`on_change: restart`. A removed service that runs is stopped; a new one is added stopped.
The `gpu:` section needs a daemon restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import TYPE_CHECKING

from loguru import logger

from gpu_manager.config import (
    PHASES_FILE,
    SERVICES_FILE,
    ConfigError,
    load_inventory,
)
from gpu_manager.orchestrator import Operation
from gpu_manager.planner import PlannerInventory, StartService, StopService
from gpu_manager.units import Unit, make_driver

if TYPE_CHECKING:
    from gpu_manager.daemon import Daemon

WATCH_EVERY_S = 1.0


class Reloader:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.error: str | None = None
        self.reloads = 0
        self._mtimes = self._stat()
        self._task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()

    def _stat(self) -> tuple[float | None, ...]:
        base = self.daemon.settings.config_dir
        out: list[float | None] = []
        for name in (SERVICES_FILE, PHASES_FILE):
            try:
                out.append((base / name).stat().st_mtime)
            except OSError:
                out.append(None)
        return tuple(out)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Linux and macOS loops take signal handlers; outside the main thread they cannot.
        with contextlib.suppress(RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        self._task = asyncio.create_task(self._watch(), name="config-watch")

    async def close(self) -> None:
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            now = self._stat()
            if now != self._mtimes:
                self._mtimes = now
                await self.reload()

    async def reload(self) -> tuple[bool, str]:
        async with self._busy:
            return await self._reload()

    async def _reload(self) -> tuple[bool, str]:
        d = self.daemon
        try:
            new = await asyncio.to_thread(load_inventory, d.settings.config_dir)
        except ConfigError as exc:
            self.error = str(exc)
            logger.error(f"config reload rejected, keeping the running inventory:\n{exc}")
            return False, self.error
        old = d.inventory
        if new.gpu != old.gpu:
            logger.warning("the gpu: section changed; that takes a daemon restart (ignored)")
        added = [n for n in new.services if n not in old.services]
        removed = [n for n in old.services if n not in new.services]
        changed = [n for n in new.services
                   if n in old.services and new.services[n] != old.services[n]]
        orch = d.orchestrator
        restart: list[str] = []
        async with orch._serial:  # no transition sees half an inventory
            for name in removed:
                unit = d.units.pop(name)
                if unit.driver.running():
                    await unit.stop("removed from the inventory")
                await unit.close()
            for name in changed:
                unit = d.units[name]
                unit.cfg = new.services[name]
                unit.driver.cfg = new.services[name]  # type: ignore[attr-defined]
                if unit.driver.running() and new.services[name].on_change == "restart":
                    restart.append(name)
            for name in added:
                unit = Unit(name, new.services[name],
                            make_driver(name, new.services[name],
                                        log_dir=d.settings.state_dir / "logs",
                                        docker=d.docker_engine, extra_env=d.unit_env),
                            d.health, d.bus, on_record=d.store.set_unit,
                            restart_gate=orch.restart_gate)
                unit.start_loop()
                d.units[name] = unit
            d.inventory = new
            orch.inventory = new
            orch.pinv = PlannerInventory.from_inventory(new)
            d.leases.cfg = new.leases
        for name in restart:
            await orch.execute(Operation(StopService(name, force=True)))
            await orch.execute(Operation(StartService(name)))
        self.error = None
        self.reloads += 1
        summary = (f"config reloaded: +{added or '[]'} -{removed or '[]'} "
                   f"~{changed or '[]'} (restarted {restart or 'none'})")
        logger.info(summary)
        return True, summary
