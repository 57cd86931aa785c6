"""A plan's release steps: stop, and sleep (ask the service, then see its VRAM come off the
GPU, else stop it)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loguru import logger

from gpu_manager.orchestrator.cards import held_on
from gpu_manager.orchestrator.ledger import Releasing
from gpu_manager.orchestrator.operations import OperationError
from gpu_manager.probe import Snapshot
from gpu_manager.units import Event, ServiceState

if TYPE_CHECKING:
    from gpu_manager.orchestrator.core import Orchestrator

S = ServiceState


class Releases:
    """A plan's release steps, stop and sleep; mixed into the Executor (which sets `orch`)."""

    orch: Orchestrator

    async def stop(self, name: str, reason: str, preemption: bool,
                   notes: list[str] | None = None) -> str | None:
        orch = self.orch
        cfg = orch.inventory.services[name]
        pids, pid_error = await orch.read_pids(name)
        mb = max(cfg.vram_mb, orch.measured(name) or 0)
        notes = list(notes or [])
        if pid_error is not None:
            notes.append(f"pid list unavailable ({pid_error}): reclaim judged by free memory "
                         "alone")
        if preemption:
            orch.count_preemption(name)
        result = await orch.units[name].stop(reason)
        if not result.ok:
            raise OperationError("stop_failed", f"could not stop {name}: {result.reason}",
                                 gpu_state=orch.gpu_state())
        orch.ledger.released(name, Releasing(pids, mb, time.monotonic(),
                                             pids_known=pid_error is None,
                                             devices=orch.cards_of(name)))
        return "; ".join(notes) or None

    async def sleep(self, name: str, reason: str, preemption: bool, requester: str,
                    explicit: bool = False) -> str | None:
        """Put `name` to sleep and see its VRAM come off the GPU; if it refuses, or answers
        but keeps its memory past its timeout, stop it instead, and say so. `explicit` (a
        sleep asked for by name): a service that is not serving is refused, not stopped."""
        orch = self.orch
        unit = orch.units[name]
        sleep = unit.cfg.sleep
        if sleep is None or sleep.residual_mb is None:  # a reload added it: next start
            return await self.stop(name, reason, preemption, [
                "its running instance has no sleep: block (a reload applies at its next "
                "start); stopped instead"])
        if explicit and unit.state != S.READY:
            raise OperationError("cannot_sleep", f"{name} is {unit.state.value}, not ready: "
                                 "nothing to put to sleep now", gpu_state=orch.gpu_state())
        pids, pid_error = await orch.read_pids(name)
        before = max(unit.cfg.vram_mb, orch.measured(name) or 0)
        result = await unit.sleep(reason, requester)
        if not result.ok:
            logger.warning(f"{name}: sleep failed ({result.reason}); stopping it instead")
            orch.bus.publish(Event("sleep_fallback", name, {"reason": result.reason}))
            return await self.stop(name, reason, preemption,
                                   [f"sleep failed ({result.reason}); stopped instead"])
        if preemption:
            orch.count_preemption(name)
        acked = time.monotonic()
        orch.ledger.released(name, Releasing(pids, max(0, before - sleep.residual_mb), acked,
                                             must_exit=False, pids_known=pid_error is None,
                                             devices=orch.cards_of(name)))
        held = (None if pid_error is not None or not pids else
                await self._confirm_sleep(name, sleep.residual_mb, sleep.timeout_s, acked))
        if held is None:  # the GPU cannot tell per process: the starts judge by free memory
            return f"{result.reason}; release judged by free memory (no per-process data)"
        if held > sleep.residual_mb:
            why = (f"answered sleep ({result.reason}) but still holds {held} MB after "
                   f"{sleep.timeout_s:g}s (residual_mb {sleep.residual_mb})")
            logger.warning(f"{name}: {why}; stopping it instead")
            orch.bus.publish(Event("sleep_fallback", name, {"reason": why}))
            return await self.stop(name, reason, False, [f"{why}; stopped instead"])
        orch.ledger.settle_soft([name])
        return f"{result.reason}; {held} MB left on the GPU"

    async def _confirm_sleep(self, name: str, residual: int, timeout: float,
                             since: float) -> int | None:
        """What `name`'s pids hold once it is at most `residual` (or at the timeout); None
        when the probe cannot attribute memory to processes."""
        orch = self.orch
        seen: list[int | None] = [None]

        pids = set(orch.ledger.view().unit_pids.get(name, ()))
        blind = [False]

        def slept(snap: Snapshot) -> bool:
            if snap.taken_at < since:
                return False
            held = held_on(snap, orch.cards, pids)
            if held is None or any(mb is None for mb in held):
                blind[0] = True
                return True
            # a process that let go of everything leaves the GPU's list: it holds 0
            total = seen[0] = sum(mb for mb in held if mb is not None)
            return total <= residual * len(orch.cards_of(name))  # residual is per card

        if not slept(orch.poller.latest):
            async with orch.poller.fast():
                await orch.poller.wait_until(slept, timeout)
        return None if blind[0] or seen[0] is None else seen[0]
