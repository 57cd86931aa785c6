"""Idle release by measured use: a served service with `idle:` is released when no request
went through the front door for `after_s` AND its own processes' GPU utilisation stayed below
`below_util_pct` all that time. A service computing on work that does not pass through the
front door (a batch job, a training step) is therefore never released under it.

Utilisation is NVML's per-process figure (`nvmlDeviceGetProcessUtilization`) for the
service's pids; where the driver gives none, the device's utilisation (which counts every
process on the card: stricter, never looser), and the status says which. With neither
figure, nothing is released: idleness that cannot be measured is not assumed.

The release is an operation like any other (`IdleSleep` / `IdleStop`: the lock, events,
metrics, the dashboard); a request that arrives before it runs makes it refuse (`not_idle`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from loguru import logger

from gpu_manager.orchestrator import OperationError
from gpu_manager.planner import IdleSleep, IdleStop
from gpu_manager.probe import Snapshot
from gpu_manager.units import ServiceState

if TYPE_CHECKING:
    from gpu_manager.config.serve import ServeConfig
    from gpu_manager.frontdoor.gate import Gate
    from gpu_manager.frontdoor.host import Host
    from gpu_manager.frontdoor.stats import DoorStats


class Door(Protocol):
    """What the idle watch reads of the front door (which holds it)."""

    daemon: Host
    stats: DoorStats

    def served(self) -> dict[str, ServeConfig]: ...

    def gate(self, name: str) -> Gate: ...

UtilSource = Literal["process", "device", "none"]


@dataclass
class IdleState:
    busy_at: float  # monotonic: the last time it was seen busy (or became ready)
    util_pct: int | None = None
    source: UtilSource = "none"
    releasing: bool = False


class IdleWatch:
    def __init__(self, door: Door, every_s: float = 0.5) -> None:
        self.door = door
        self.every_s = every_s
        self.state: dict[str, IdleState] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """The supervised loop (a crash is logged and restarted by the daemon's Supervisor)."""
        try:
            while True:
                self.tick(time.monotonic())
                await asyncio.sleep(self.every_s)
        finally:
            for task in self._tasks:
                task.cancel()

    def tick(self, now: float) -> None:
        door = self.door
        snap = door.daemon.poller.latest
        for name, cfg in door.served().items():
            st = self.state.setdefault(name, IdleState(now))
            unit = door.daemon.units.get(name)
            if cfg.idle is None or unit is None or unit.state is not ServiceState.READY:
                st.busy_at = now  # the timer runs from when it is ready
                continue
            st.util_pct, st.source = self.measure(name, snap)
            gate = door.gate(name)
            if st.util_pct is None or st.util_pct >= cfg.idle.below_util_pct or gate.busy:
                st.busy_at = now
            quiet = now - max(st.busy_at, gate.last_active)
            if quiet >= cfg.idle.after_s and not st.releasing:
                sleep = cfg.idle.then == "sleep" and unit.cfg.sleep is not None
                st.releasing = True
                task = asyncio.create_task(self._release(name, sleep, quiet),
                                           name=f"idle-release-{name}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def idle_for(self, name: str, now: float) -> float | None:
        st = self.state.get(name)
        if st is None:
            return None
        return max(0.0, now - max(st.busy_at, self.door.gate(name).last_active))

    def measure(self, name: str, snap: Snapshot) -> tuple[int | None, UtilSource]:
        """The highest utilisation among `name`'s processes on its cards, and whose figure
        it is."""
        view = self.door.daemon.orchestrator
        pids = set(view.ledger.view().unit_pids.get(name, ()))
        best: int | None = None
        for card in view.cards_of(name):
            dev = snap.device(card)
            if dev is None:
                return None, "none"
            mine = [p for p in dev.processes or () if p.pid in pids]
            if dev.processes is not None and all(p.util_pct is not None for p in mine):
                figure = max((p.util_pct or 0 for p in mine), default=0)
            elif dev.utilization_percent is not None:
                return self._device(name, snap)
            else:
                return None, "none"
            best = figure if best is None else max(best, figure)
        return best, "process"

    def _device(self, name: str, snap: Snapshot) -> tuple[int | None, UtilSource]:
        figures = [d.utilization_percent for c in self.door.daemon.orchestrator.cards_of(name)
                   if (d := snap.device(c)) is not None]
        if not figures or any(f is None for f in figures):
            return None, "none"
        return max(f for f in figures if f is not None), "device"

    async def _release(self, name: str, sleep: bool, quiet: float) -> None:
        door = self.door
        request = IdleSleep(name) if sleep else IdleStop(name)
        outcome = "released"
        try:
            logger.info(f"front door: {name} idle for {quiet:.1f}s; "
                        f"{'sleeping' if sleep else 'stopping'} it")
            _, task, _ = door.daemon.orchestrator.submit(request)
            await asyncio.shield(task)
        except OperationError as exc:
            outcome = "refused" if exc.code == "not_idle" else "failed"
            logger.info(f"front door: idle release of {name} {outcome}: {exc.detail}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a lock error, a bug: seen, and tried again later
            outcome = "failed"
            logger.opt(exception=exc).error(f"front door: idle release of {name} failed: {exc}")
        finally:
            door.stats.idle.labels(name, outcome).inc()
            st = self.state.get(name)
            if st is not None:
                st.releasing = False
                st.busy_at = time.monotonic()  # a failed release is not retried at once
