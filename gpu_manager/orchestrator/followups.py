"""What follows a transition: prewarm (start or wake the next phase's services where they
fit, ranked below everything) and waking the sleepers that wait for room. Both run as
ordinary operations (under the GPU lock, in the operation log), in the background."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger

from gpu_manager.aio import guarded
from gpu_manager.config import Inventory
from gpu_manager.orchestrator.operations import Operation
from gpu_manager.planner import PreparePhase, Prewarm, Request, StartService, StopAll, StopService
from gpu_manager.units import ServiceState, Unit

S = ServiceState


class Followups:
    """Mixed into the Orchestrator (orchestrator/core.py), which provides these."""

    inventory: Inventory
    units: dict[str, Unit]
    accepting: bool
    prewarmed: frozenset[str]
    _background: set[asyncio.Task[None]]

    @property
    def busy(self) -> bool:
        raise NotImplementedError

    async def execute(self, op: Operation) -> Operation:
        raise NotImplementedError

    def note_prewarm(self, request: Request, done: dict[str, str]) -> None:
        """After a plan: what prewarm started is prewarmed; what a phase lists, a start asks
        for, or a release let go is not any more."""
        names = set(self.prewarmed)
        if isinstance(request, Prewarm) and request.phase is not None:
            names |= {n for n, action in done.items() if action in ("start", "wake")}
        elif isinstance(request, PreparePhase) and request.phase in self.inventory.phases:
            phase = self.inventory.phases[request.phase]
            names -= {*phase.services, *phase.keep}
        elif isinstance(request, StartService):
            names.discard(request.name)
        names -= {n for n, action in done.items() if action in ("stop", "sleep")}
        self.prewarmed = frozenset(n for n in names if n in self.units
                                   and self.units[n].holds_gpu)

    def live_prewarmed(self) -> frozenset[str]:
        """Prewarmed and still up: one that died or was stopped since is itself again."""
        return frozenset(n for n in self.prewarmed
                         if n in self.units and self.units[n].holds_gpu)

    async def wake_when_free(self) -> None:
        """After a release: wake the sleepers that asked for it (`wake_when_free`, the pause
        protocol's resume) if they fit without moving anything. Never queues behind a
        transition (the next release tries again); refusals and failures are logged."""
        names = tuple(n for n, u in list(self.units.items())
                      if u.state == S.SLEEPING and u.cfg.sleep is not None
                      and u.cfg.sleep.wake_when_free and n in self.inventory.services)
        if not names or not self.accepting or self.busy:
            return
        try:
            await self.execute(Operation(Prewarm(None, names)))
        except Exception as exc:  # LockHeld, a failed wake: the op log has it
            logger.info(f"wake when free ({', '.join(names)}): {exc}")

    def _after(self, request: Request) -> None:
        """After a release (a stop, release-all): wake the sleepers that wait for room. After
        a phase: prewarm the phase that usually follows, when asked to."""
        if isinstance(request, StopService | StopAll):
            self.background(self.wake_when_free, "wake-when-free")
        if not isinstance(request, PreparePhase) or not self.inventory.prewarm:
            return
        phase = self.inventory.phases.get(request.phase)
        if phase is not None and phase.next is not None:
            nxt = phase.next
            self.background(lambda: self.prewarm(nxt), f"prewarm-{nxt}")

    def background(self, work: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run `work` beside the caller (a wake after a release, a prewarm after a phase):
        guarded (a crash is logged with its traceback), cancelled at close."""
        task = asyncio.create_task(guarded(work, name, lambda exc: None), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def prewarm(self, phase: int) -> None:
        """Ready `phase`'s services in the background where they fit (settings: prewarm)."""
        if not self.accepting:
            return
        try:
            await self.execute(Operation(Prewarm(phase)))
        except Exception as exc:
            logger.info(f"prewarm for phase {phase}: {exc}")
