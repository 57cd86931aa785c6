"""What follows a transition: prewarm (start or wake the next phase's services where they
fit, ranked below everything) and waking the sleepers that wait for room. Both run as
ordinary operations (under the GPU lock, in the operation log), in the background."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from loguru import logger

from gpu_manager.aio import guarded, settle
from gpu_manager.orchestrator.operations import Operation
from gpu_manager.orchestrator.view import GpuView
from gpu_manager.planner import PreparePhase, Prewarm, Request, StartService, StopAll, StopService
from gpu_manager.units import ServiceState

S = ServiceState


class Followups:
    """Owned by the Orchestrator: the view's prewarmed set (its only writer) and the
    background operations that follow a transition, run through `execute` like any other.
    `accepting`: not shutting down; `busy`: a transition holds the lane."""

    def __init__(self, view: GpuView, execute: Callable[[Operation], Awaitable[Any]],
                 accepting: Callable[[], bool], busy: Callable[[], bool]) -> None:
        self.view = view
        self._execute = execute
        self._accepting = accepting
        self._busy = busy
        self.tasks: set[asyncio.Task[None]] = set()

    def note(self, request: Request, done: dict[str, str]) -> None:
        """After a plan: what prewarm started is prewarmed; what a phase lists, a start asks
        for, or a release let go is not any more."""
        view = self.view
        names = set(view.prewarmed)
        if isinstance(request, Prewarm) and request.phase is not None:
            names |= {n for n, action in done.items() if action in ("start", "wake")}
        elif isinstance(request, PreparePhase) and request.phase in view.inventory.phases:
            phase = view.inventory.phases[request.phase]
            names -= {*phase.services, *phase.keep}
        elif isinstance(request, StartService):
            names.discard(request.name)
        names -= {n for n, action in done.items() if action in ("stop", "sleep")}
        view.prewarmed = frozenset(n for n in names if n in view.units)

    def live(self) -> frozenset[str]:
        """Prewarmed and still up: one that died or was stopped since is itself again."""
        return self.view.live_prewarmed()

    async def wake_when_free(self) -> None:
        """After a release: wake the sleepers that asked for it (`wake_when_free`, the pause
        protocol's resume) if they fit without moving anything. Never queues behind a
        transition (the next release tries again); refusals and failures are logged."""
        view = self.view
        names = tuple(n for n, u in list(view.units.items())
                      if u.state == S.SLEEPING and u.cfg.sleep is not None
                      and u.cfg.sleep.wake_when_free and n in view.inventory.services)
        if not names or not self._accepting() or self._busy():
            return
        try:
            await self._execute(Operation(Prewarm(None, names)))
        except Exception as exc:  # LockHeld, a failed wake: the op log has it
            logger.info(f"wake when free ({', '.join(names)}): {exc}")

    def after(self, request: Request) -> None:
        """After a release (a stop, release-all): wake the sleepers that wait for room. After
        a phase: prewarm the phase that usually follows, when asked to."""
        if isinstance(request, StopService | StopAll):
            self.background(self.wake_when_free, "wake-when-free")
        if not isinstance(request, PreparePhase) or not self.view.inventory.prewarm:
            return
        phase = self.view.inventory.phases.get(request.phase)
        if phase is not None and phase.next is not None:
            nxt = phase.next
            self.background(lambda: self.prewarm(nxt), f"prewarm-{nxt}")

    def background(self, work: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        """Run `work` beside the caller (a wake after a release, a prewarm after a phase):
        guarded (a crash is logged with its traceback), cancelled at close."""
        task = asyncio.create_task(guarded(work, name, lambda exc: None), name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def prewarm(self, phase: int) -> None:
        """Ready `phase`'s services in the background where they fit (settings: prewarm)."""
        if not self._accepting():
            return
        try:
            await self._execute(Operation(Prewarm(phase)))
        except Exception as exc:
            logger.info(f"prewarm for phase {phase}: {exc}")

    async def settle(self, timeout: float = 5.0) -> None:
        """Shutdown: end prewarm and wake-when-free operations before anything else goes
        (their `finally` drops the GPU lock)."""
        await settle(list(self.tasks), timeout)
