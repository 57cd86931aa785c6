"""Hot reload: SIGHUP, a change of services.yaml / phases.yaml, or POST /gpu/reload.

The new files are validated first; a bad one keeps the old inventory, is logged and shown in
`/ready`. The swap itself is the orchestrator's (`apply_inventory`): under the same
serialisation as transitions, through the units' own inboxes, so no transition ever sees half
an inventory and no unit is changed behind its owner loop. Services whose definition did not
change are not touched. A changed service keeps running on its old definition until its next
start, or is restarted now when it says `on_change: restart`. A removed service that runs is
stopped (if its stop fails it stays, counted and shown, and the next reload tries again); a
new one is added stopped. The `gpu:` section needs a daemon restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from gpu_manager.aio import wait_event
from gpu_manager.config import (
    PHASES_FILE,
    SERVICES_FILE,
    ConfigError,
    LeaseConfig,
    load_inventory,
)
from gpu_manager.orchestrator import Operation, Orchestrator
from gpu_manager.orchestrator.reconfig import UnitFactory
from gpu_manager.planner import StartService, StopService

WATCH_EVERY_S = 1.0
LOAD_TIMEOUT_S = 10.0


class Reloader:
    """Reads `config_dir`, swaps the inventory in `orch` through units built by `make`, and
    hands the new `leases:` section to `on_leases`."""

    def __init__(self, config_dir: Path, orch: Orchestrator, make: UnitFactory,
                 on_leases: Callable[[LeaseConfig], None]) -> None:
        self.config_dir = config_dir
        self.orch = orch
        self.make = make
        self.on_leases = on_leases
        self.error: str | None = None
        self.reloads = 0
        self._mtimes = self._stat()
        self._busy = asyncio.Lock()
        self._hup = asyncio.Event()

    def _stat(self) -> tuple[float | None, ...]:
        base = self.config_dir
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
        # The handler only sets a flag: the reload runs in the supervised watch task.
        with contextlib.suppress(RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._hup.set)

    async def close(self) -> None:
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    async def watch(self) -> None:
        """Run by the daemon's supervisor: reload on SIGHUP or when a file changes."""
        while True:
            await wait_event(self._hup, WATCH_EVERY_S)
            hup, now = self._hup.is_set(), self._stat()
            self._hup.clear()
            if hup or now != self._mtimes:
                self._mtimes = now
                await self.reload()

    async def reload(self) -> tuple[bool, str]:
        async with self._busy:
            return await self._reload()

    async def _reload(self) -> tuple[bool, str]:
        orch = self.orch
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                new = await asyncio.to_thread(load_inventory, self.config_dir)
        except ConfigError as exc:
            self.error = str(exc)
            logger.error(f"config reload rejected, keeping the running inventory:\n{exc}")
            return False, self.error
        except TimeoutError:
            self.error = f"reading the config took longer than {LOAD_TIMEOUT_S:g}s"
            logger.error(f"config reload abandoned: {self.error}")
            return False, self.error
        for issue in new.warnings:
            logger.warning(f"config: {issue}")
        if new.gpu != orch.inventory.gpu:
            logger.warning("the gpu: section changed; that takes a daemon restart (ignored)")
        res = await orch.apply_inventory(new, self.make)
        self.on_leases(new.leases)
        restarted: list[str] = []
        for name in res.restart:
            try:
                await orch.execute(Operation(StopService(name, force=True)))
                await orch.execute(Operation(StartService(name)))
                restarted.append(name)
            except Exception as exc:  # the reload stands; the restart's failure is reported
                logger.error(f"{name}: restart after its change failed: {exc}")
        self.error = None if not res.kept else (
            "removed but still running (stop failed): "
            + "; ".join(f"{n}: {why}" for n, why in res.kept.items()))
        self.reloads += 1
        summary = (f"config reloaded: +{res.added or '[]'} -{res.removed or '[]'} "
                   f"~{res.changed or '[]'} (restarted {restarted or 'none'})"
                   + (f"; {self.error}" if self.error else ""))
        logger.info(summary)
        return True, summary
