"""The orchestrator: the facade the API calls. One transition at a time per GPU, under the
GPU lock; the VRAM books in the ledger; the inventory swapped only through `apply_inventory`.

For each request: take the local queue (FIFO), take the GPU lock (423 if someone else holds
it), observe, plan (pure), then run the plan (`executor.PlanRun`). The lock is held until the
last start, so the VRAM the stops free stays with this request. Whatever happens (a refusal,
a failed step, the overall deadline, a cancel at shutdown) the operation ends with a status
and the lock is dropped.

The queue (the serial lane) is bounded twice: by how many operations the API lets wait
(429 past `max_pending_operations`), and by how long one may wait for its turn
(`queue_wait_s`, then 429 `queue_timeout`). A request identical to the operation running
or last in the queue joins it: nothing different runs between them, so its outcome is that
operation's (a `prepare-phase 3` while phase 3 is being prepared).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
from loguru import logger

from gpu_manager.aio import Held, retrieve
from gpu_manager.bounds import DEFAULT, Bounds
from gpu_manager.config import Inventory
from gpu_manager.lock import GpuLock, LockHeld, LockLost, LockUnavailable
from gpu_manager.lock.keeper import LockKeeper
from gpu_manager.orchestrator.deadlines import lock_call, plan_bound
from gpu_manager.orchestrator.executor import PlanRun
from gpu_manager.orchestrator.followups import Followups
from gpu_manager.orchestrator.operations import (
    Operation,
    OperationError,
    OperationLog,
    refusal_error,
)
from gpu_manager.orchestrator.reconfig import ReloadResult, UnitFactory, apply_inventory
from gpu_manager.orchestrator.view import PREWARM_PRIORITY, GpuView
from gpu_manager.planner import (
    Plan,
    Prewarm,
    Refusal,
    Request,
    SleepService,
    StartService,
    plan,
)
from gpu_manager.probe import Poller
from gpu_manager.state_store import StateStore
from gpu_manager.units import Event, EventBus, ServiceState, Unit

S = ServiceState
REFUSAL_CODES = frozenset({"unknown_service", "unknown_phase", "insufficient_vram", "not_idle",
                           "swap_busy",
                           "needed_by_phase", "cannot_sleep", "not_running",
                           "unmanaged_device"})

__all__ = ["PREWARM_PRIORITY", "Orchestrator"]


class Orchestrator(GpuView):
    def __init__(
        self, inventory: Inventory, units: dict[str, Unit], poller: Poller, lock: GpuLock,
        bus: EventBus, store: StateStore, *, lock_wait_s: float = 0.0,
        reclaim_timeout_s: float = 30.0, on_lock_change: Callable[[], None] | None = None,
        bounds: Bounds = DEFAULT, queue_wait_s: float = 60.0,
    ) -> None:
        super().__init__(inventory, units, poller, bus, store,
                         reclaim_timeout_s=reclaim_timeout_s, bounds=bounds)
        self.lock = lock
        self.lock_wait_s = lock_wait_s
        self.queue_wait_s = queue_wait_s
        self.ops = OperationLog()
        self.redis_url: str | None = None
        self.http = httpx.AsyncClient(trust_env=False)
        self._serial = asyncio.Lock()
        self.keeper = LockKeeper(lock, on_lock_change, on_lost=self._lock_lost,
                                 on_retaken=self._lock_retaken)
        self.serial_plans = False  # settings.plan_mode == "serial"
        # False from the start of shutdown: no restarts, no new leases.
        self.accepting = True
        self.followups = Followups(self, self.execute, lambda: self.accepting,
                                   lambda: self.busy)
        self._current: tuple[Operation, asyncio.Task[Any]] | None = None  # the one running
        self._lane: list[Operation] = []  # waiting for their turn, first first
        self._submitted: dict[str, asyncio.Task[Operation]] = {}  # by op id, until done

    @property
    def busy(self) -> bool:
        return self._serial.locked()

    @property
    def queued(self) -> int:
        return len(self._lane)

    @property
    def pending(self) -> int:
        """Operations submitted (queued or running) and not yet done."""
        return len(self._submitted)

    async def dry_run(self, request: Request) -> Plan | Refusal:
        await self.refresh_pids()
        return plan(self.planner_inventory(), self.observed(), request)

    # -- what the GPU lock's owner tells us ---------------------------------------------------
    def _lock_lost(self, labels: list[str], why: str, holder: str | None) -> None:
        """The lock went to someone else (or an operator took it): the leases that relied on
        it are lost to their clients (operations learn at their next check)."""
        for label in labels:
            lease = self.ledger.lose(label, why)
            if lease is not None:
                self.bus.publish(Event("lease", None, {
                    "session_id": lease.session_id, "requester": lease.requester,
                    "status": "lost", "vram_mb": lease.vram_mb, "reason": why}))
        self.bus.publish(Event("lock", None, {"status": "lost", "reason": why,
                                              "holder": holder, "revoked": labels}))

    def _lock_retaken(self, why: str) -> None:
        self.bus.publish(Event("lock", None, {"status": "retaken", "reason": why,
                                              "holder": None, "revoked": []}))

    # -- execution ----------------------------------------------------------------------------
    def _joinable(self, request: Request) -> Operation | None:
        """The operation running or last in the queue, if it is `request` itself: nothing
        different runs between them, so its outcome is the outcome of `request`."""
        last = self._lane[-1] if self._lane else \
            (self._current[0] if self._current is not None else None)
        if last is not None and last.request == request and last.id in self._submitted \
                and not last.done:
            return last
        return None

    def would_join(self, request: Request) -> bool:
        return self._joinable(request) is not None

    def submit(self, request: Request) -> tuple[Operation, asyncio.Task[Operation], bool]:
        """Run `request` as an operation in the background, or join the identical one that
        is running or last in the queue. Returns the operation, its task, and whether it
        was joined."""
        last = self._joinable(request)
        if last is not None:
            last.joined += 1
            return last, self._submitted[last.id], True
        op = self.ops.add(Operation(request))
        self._lane.append(op)  # now, not when the task first runs: the next submit sees it
        task = asyncio.create_task(self.execute(op), name=f"op-{op.id}")
        self._submitted[op.id] = task

        def forget(t: asyncio.Task[Operation]) -> None:
            self._submitted.pop(op.id, None)
            retrieve(t)  # the outcome lives in the operation log

        task.add_done_callback(forget)
        return op, task, False

    def in_flight(self) -> list[asyncio.Task[Operation]]:
        """The tasks of the operations submitted and not yet done."""
        return list(self._submitted.values())

    def cancel_all(self, code: str, why: str) -> None:
        """Shutdown: every operation queued or running ends now, failed with (code, why),
        its lock dropped by its own `finally`; its caller is answered."""
        ops = [*self._lane, *([self._current[0]] if self._current is not None else [])]
        for op in ops:
            if not op.done and op.cancelled_because is None:
                op.cancelled_because = (code, why)
        for task in self._submitted.values():
            task.cancel()
        if self._current is not None:
            self._current[1].cancel()  # (a lease's or a follow-up's, not submitted here)

    async def execute(self, op: Operation) -> Operation:
        """Run `op` to its end; raises OperationError (or a lock error) when it fails."""
        self.ops.add(op)
        if op not in self._lane:
            self._lane.append(op)
        self.bus.publish(Event("operation", None, {"id": op.id, "status": "queued"}))
        running = self._current
        if running is not None and isinstance(running[0].request, Prewarm) \
                and not isinstance(op.request, Prewarm):
            # a prewarm is a guess: it gives way to any real request (what it started goes on
            # starting in its unit; the request's plan sees it and waits for it if it wants it)
            logger.info(f"{running[0].label} gives way to {op.label}")
            running[0].cancelled_because = ("superseded", f"gave way to {op.label}")
            running[1].cancel()
        try:
            async with asyncio.timeout(self.queue_wait_s):
                await self._serial.acquire()
        except TimeoutError:
            why = (f"waited {self.queue_wait_s:g}s for its turn behind {len(self._lane) - 1} "
                   "operation(s); retry later")
            op.finish("failed", {"error": "queue_timeout", "detail": why})
            raise OperationError("queue_timeout", why) from None
        except asyncio.CancelledError:  # cancelled while queued (shutdown, a give-up)
            code, why = op.cancelled_because or ("cancelled", "cancelled while queued")
            op.finish("failed", {"error": code, "detail": why})
            raise
        finally:
            self._lane.remove(op)
        async with Held(self._serial):
            await self._run(op)
        return op

    async def _run(self, op: Operation) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._current = (op, task)
        op.status, op.started_at = "running", time.time()
        self.store.set_operation(op.id, op.as_dict())
        t0 = time.monotonic()
        try:
            await self._execute(op)
        except OperationError as exc:
            op.finish("refused" if exc.code in REFUSAL_CODES else "failed",
                      {"error": exc.code, "detail": exc.detail, **exc.extra})
            raise
        except (LockHeld, LockUnavailable, LockLost) as exc:
            op.finish("failed", {"error": type(exc).__name__, "detail": str(exc)})
            raise
        except BaseException as exc:  # cancelled or a bug: never leave it "running"
            code, why = op.cancelled_because or ("internal", repr(exc))
            op.finish("failed", {"error": code, "detail": why})
            raise
        else:
            op.finish("succeeded")
            self.followups.after(op.request)
        finally:
            self._current = None
            self.store.set_operation(op.id, None)
            self.bus.publish(Event("operation", None, op.as_dict()))
            why = f" ({op.error})" if op.error else ""
            took = time.monotonic() - t0
            logger.bind(op=op.id, status=op.status, duration_s=took).info(
                f"operation {op.label}: {op.status} in {took:.3f}s{why}")

    async def _execute(self, op: Operation) -> None:
        bound = self.lock_wait_s + self.bounds.lock_io_s
        try:
            async with asyncio.timeout(bound):
                claim = await self.keeper.hold(op.label, self.lock_wait_s)
        except TimeoutError as exc:
            raise LockUnavailable(f"the lock backend did not answer within {bound:g}s") from exc
        try:
            await self.refresh_pids()
            result = plan(self.planner_inventory(), self.observed(), op.request)
            if isinstance(result, Refusal):
                raise refusal_error(result)
            op.set_plan(result)
            bound = op.deadline_s = plan_bound(self, result)
            run = PlanRun(self, op, result, claim, serial=self.serial_plans)
            try:
                async with asyncio.timeout(bound):
                    await run.run()
            except TimeoutError as exc:
                raise OperationError(
                    "deadline_exceeded", f"the plan did not finish within {bound:g}s (the sum "
                    "of its steps' deadlines)", gpu_state=self.gpu_state()) from exc
            finally:  # what ran is what it is, whether a sibling failed or a deadline struck
                self.followups.note(op.request, run.done())
            if isinstance(op.request, SleepService) and op.request.name in run.fell_back:
                raise OperationError("sleep_failed", run.fell_back[op.request.name],
                                     success=False, stopped=True, gpu_state=self.gpu_state())
        finally:
            await self._drop_lock(op.label)
            try:  # so status read right after the answer shows the pids as they are now
                await self.refresh_pids()
            except Exception as exc:
                logger.opt(exception=exc).error(f"pid refresh after {op.label} failed: {exc}")

    async def _drop_lock(self, label: str) -> None:
        try:
            await lock_call("release", self.keeper.drop(label), self.bounds.lock_io_s)
        except Exception as exc:  # Redis gone: the key expires by its TTL
            logger.opt(exception=exc).error(f"could not release the GPU lock ({label}): {exc}")

    async def _try_serial(self) -> bool:
        """Take the transition lock only if nobody holds or waits for it. `locked()` alone is
        not enough: between a release and the next waiter's wake-up it reads False while
        `acquire()` would still queue behind that waiter, maybe for a whole transition."""
        if self._serial.locked():
            return False
        try:
            async with asyncio.timeout(0):  # the uncontended path takes it without waiting
                await self._serial.acquire()
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        await self.followups.settle(2.0)
        await self.costs.flush()  # what was learned survives the restart
        for read in self._pid_reads.values():  # a read still hung in a driver: not awaited
            read.cancel()
        await self.keeper.close()
        await self.http.aclose()

    # -- the inventory, swapped through its owners --------------------------------------------
    async def apply_inventory(self, new: Inventory, make: UnitFactory) -> ReloadResult:
        """Swap in a new inventory under the same serialisation as transitions."""
        async with self._serial:
            return await apply_inventory(self, new, make)

    # -- restart gate -------------------------------------------------------------------------
    async def restart_gate(self, name: str) -> bool:
        """May a crashed unit restart itself? Only when it fits without stopping anything and
        nobody holds the GPU lock; a restart never preempts."""
        if not self.accepting or not await self._try_serial():
            # Shutting down, or a transition is in flight (it may be waiting on this very
            # unit): never queue behind it; decline, the unit tries again later.
            return False
        try:
            try:
                async with asyncio.timeout(self.bounds.lock_io_s):
                    info = await self.lock.info()
            except TimeoutError:
                return False
            if info.holder is not None and not self.keeper.owns(info.holder):
                return False  # someone else (legacy code, another daemon) owns the GPU
            if name not in self.inventory.services:
                return False
            await self.refresh_pids()
            result = plan(self.planner_inventory(), self.observed(), StartService(name))
            if not isinstance(result, Plan) or result.stops:
                return False
            # Several cards: a restart relaunches where it ran (the executor is not in the
            # way to place it elsewhere), so it may go only if the plan puts it there.
            cards = {d for s in result.starts for d in s.devices}
            return not self.inventory.gpu.several or not cards or \
                cards == set(self.cards_of(name))
        finally:
            self._serial.release()
