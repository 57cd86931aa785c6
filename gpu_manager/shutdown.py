"""The daemon's graceful shutdown: from the first SIGTERM, no new work, and the operations
and front-door requests in flight get the budget's time (less what the stop keeps) to end."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from loguru import logger

from gpu_manager.hooks import RequestDoor

if TYPE_CHECKING:
    from gpu_manager.bounds import Bounds
    from gpu_manager.orchestrator import Orchestrator
    from gpu_manager.orchestrator.leases import LeaseManager
    from gpu_manager.settings import Settings

# Of the shutdown budget (from SIGTERM), what the daemon's own stop keeps for itself after
# the operations in flight (units, lock, clients, the state file; each step bounded).
STOP_RESERVE_S = 3.0


class GracefulShutdown:
    """Mixed into the Daemon, which sets these."""

    settings: Settings
    orchestrator: Orchestrator
    leases: LeaseManager
    bounds: Bounds
    door: RequestDoor | None
    accepting: bool
    shutdown_deadline: float | None
    _shutdown_timer: asyncio.Task[None] | None

    def begin_shutdown(self) -> float:
        """At the first SIGTERM (or the server's end, whichever comes first): take no new
        work, and give the operations in flight until the returned deadline (monotonic), so
        that the whole shutdown fits `shutdown_timeout_s` counted from the signal. At the
        deadline they are cancelled and their callers answered 503 `shutting_down`."""
        if self.shutdown_deadline is None:
            self.accepting = self.orchestrator.accepting = False
            self.leases.abandon_all()  # their clients hear 503 now, no new plan begins
            self.shutdown_deadline = time.monotonic() + max(
                0.0, self.settings.shutdown_timeout_s - STOP_RESERVE_S)
            self._shutdown_timer = asyncio.get_running_loop().create_task(
                self._cancel_at(self.shutdown_deadline), name="shutdown-deadline")
            if self.door is not None:  # waiting requests hear 503; in flight: until then
                self.door.shutting_down(self.shutdown_deadline)
        return self.shutdown_deadline

    async def _cancel_at(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        if self.orchestrator.in_flight() or self.orchestrator.busy:
            logger.warning("shutdown: cancelling the operations still in flight")
            self.orchestrator.cancel_all("shutting_down", "the daemon is stopping (SIGTERM) "
                                         "and this operation ran out of the shutdown budget")

    async def finish_operations(self, deadline: float) -> None:
        """Wait (until `deadline`) for the operations in flight; cancel what is left."""
        pending = self.orchestrator.in_flight()
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if any(not t.done() for t in pending) or self.orchestrator.busy:
            self.orchestrator.cancel_all("shutting_down", "the daemon is stopping")
            still = [t for t in pending if not t.done()]
            if still:
                await asyncio.wait(still, timeout=self.bounds.shutdown_step_s)
