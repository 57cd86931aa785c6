"""A plan's release steps: stop, and sleep (ask the service, then see its VRAM come off the
GPU, else stop it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import psutil
from loguru import logger

from gpu_manager.orchestrator.ledger import Releasing
from gpu_manager.orchestrator.operations import OperationError
from gpu_manager.orchestrator.view import GpuView
from gpu_manager.probe import Snapshot
from gpu_manager.units import Event, ServiceState

S = ServiceState


class Releases:
    """A plan's release steps, stop and sleep; mixed into the PlanRun (which sets `view`)."""

    view: GpuView
    # Services this run asked to sleep that were stopped instead (the sleep refused, or
    # its memory stayed): an explicit sleep must not answer success for them.
    fell_back: dict[str, str]

    async def stop(self, name: str, reason: str, preemption: bool,
                   notes: list[str] | None = None) -> str | None:
        view = self.view
        cfg = view.inventory.services[name]
        pids, pid_error = await view.read_pids(name)
        cards = view.cards_of(name)
        mb = max(cfg.vram_mb * len(cards), view.measured(name) or 0)  # vram_mb: per card
        notes = list(notes or [])
        if pid_error is not None:
            notes.append(f"pid list unavailable ({pid_error}): reclaim judged by free memory "
                         "alone")
        if preemption:
            view.count_preemption(name)
        result = await view.units[name].stop(reason)
        if not result.ok:
            raise OperationError("stop_failed", f"could not stop {name}: {result.reason}",
                                 gpu_state=view.gpu_state())
        view.ledger.released(name, Releasing(pids, mb, time.monotonic(),
                                             pids_known=pid_error is None, devices=cards))
        return "; ".join(notes) or None

    async def _instead(self, name: str, reason: str, preemption: bool, why: str) -> str | None:
        """The sleep did not free the VRAM: stop the service instead, and say so."""
        logger.warning(f"{name}: {why}; stopping it instead")
        self.view.bus.publish(Event("sleep_fallback", name, {"reason": why}))
        self.fell_back[name] = f"{why}; stopped instead"
        return await self.stop(name, reason, preemption, [f"{why}; stopped instead"])

    async def sleep(self, name: str, reason: str, preemption: bool, requester: str,
                    explicit: bool = False, deep: bool = False) -> str | None:
        """Put `name` to sleep and see its VRAM come off the GPU; if it refuses, or answers
        but keeps its memory past its timeout, stop it instead, and say so. `explicit` (a
        sleep asked for by name): a service that is not serving is refused, not stopped."""
        view = self.view
        unit = view.units[name]
        sleep = unit.cfg.sleep
        if sleep is None or sleep.residual_mb is None:  # a reload added it: next start
            return await self._instead(name, reason, preemption,
                                       "its running instance has no sleep: block (a reload "
                                       "applies at its next start)")
        if explicit and unit.state != S.READY:
            raise OperationError("cannot_sleep", f"{name} is {unit.state.value}, not ready: "
                                 "nothing to put to sleep now", gpu_state=view.gpu_state())
        pids, pid_error = await view.read_pids(name)
        cards = view.cards_of(name)
        before = max(unit.cfg.vram_mb * len(cards), view.measured(name) or 0)
        rss_before = await host_rss_mb(pids)
        result = await unit.sleep(reason, requester, deep)
        ladder = ""
        if not result.ok and not deep and unit.cfg.checkpoint_fallback:
            # its ladder's next rung before a stop: a checkpoint needs nothing of its API
            ladder = f"its sleep failed ({result.reason}); "
            deep = True
            result = await unit.sleep(reason, requester, deep)
        if not result.ok:
            return await self._instead(name, reason, preemption,
                                       f"{ladder}sleep failed ({result.reason})")
        if preemption:
            view.count_preemption(name)
        acked = time.monotonic()
        residual = 0 if deep else sleep.residual_mb  # a checkpoint keeps nothing
        view.ledger.released(name, Releasing(
            pids, max(0, before - residual * len(cards)), acked, must_exit=False,
            pids_known=pid_error is None, devices=cards))
        held = (None if pid_error is not None or not pids else
                await self._confirm_sleep(name, sleep.timeout_s, acked))
        if held is None:  # the GPU cannot tell per process: the starts judge by free memory
            return f"{result.reason}; release judged by free memory (no per-process data)"
        over, total = held
        if over:
            return await self._instead(
                name, reason, False, f"answered sleep ({result.reason}) but still holds "
                f"{total} MB after {sleep.timeout_s:g}s (residual_mb {sleep.residual_mb} "
                f"per card on {len(cards)} card{'s' if len(cards) > 1 else ''})")
        view.ledger.settle_soft([name])
        note = f"{ladder}{result.reason}; {total} MB left on the GPU"
        rss_after = await host_rss_mb(pids)
        if rss_before is not None and rss_after is not None and \
                view.inventory.host.simulated_total_mb is None:
            # what this sleep holds in host RAM, from now on the planner's figure
            view.host_ram[name] = max(0, rss_after - rss_before)
            note += f"; {view.host_ram[name]} MB more in host RAM"
        return note

    async def _confirm_sleep(self, name: str, timeout: float,
                             since: float) -> tuple[bool, int] | None:
        """Once `name` holds at most its residual on each card (or at the timeout): whether
        it still holds more, and what it holds; None when the probe cannot attribute memory
        to processes."""
        view = self.view
        seen: list[tuple[bool, int] | None] = [None]
        blind = [False]

        def slept(snap: Snapshot) -> bool:
            if snap.taken_at < since:
                return False
            over, total = view.past_residual(name, snap)
            if over is None or total is None:
                blind[0] = True
                return True
            seen[0] = (over, total)
            return not over

        if not slept(view.poller.latest):
            async with view.poller.fast():
                await view.poller.wait_until(slept, timeout)
        return None if blind[0] else seen[0]


async def host_rss_mb(pids: Iterable[int]) -> int | None:
    """The resident memory of `pids` in MB (None: not readable), read off the event loop
    and bounded (a /proc read of a process in D state can block)."""
    pids = list(pids)

    def read() -> int:
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        return total // (1024 * 1024)

    if not pids:
        return None
    try:
        async with asyncio.timeout(2.0):
            return await asyncio.to_thread(read)
    except TimeoutError:
        return None
