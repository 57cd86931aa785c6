"""The orchestrator: the facade the API calls. One transition at a time per GPU, under the
GPU lock; the VRAM books in the ledger; the inventory swapped only through `apply_inventory`.

For each request: take the local queue (FIFO), take the GPU lock (423 if someone else holds
it), observe, plan (pure), then run the plan (`executor.Executor`). The lock is held until the
last start, so the VRAM the stops free stays with this request. Whatever happens (a refusal,
a failed step, the overall deadline, a cancel at shutdown) the operation ends with a status
and the lock is dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
from loguru import logger

from gpu_manager.aio import Held, retrieve
from gpu_manager.bounds import DEFAULT, Bounds
from gpu_manager.config import Inventory
from gpu_manager.lock import GpuLock, LockHeld, LockLost, LockUnavailable
from gpu_manager.lock.keeper import LockKeeper
from gpu_manager.orchestrator.cards import held_on, listed_pids, observed_cards
from gpu_manager.orchestrator.executor import (
    Executor,
    lock_call,
    plan_bound,
    refusal_error,
)
from gpu_manager.orchestrator.followups import Followups
from gpu_manager.orchestrator.ledger import Ledger
from gpu_manager.orchestrator.operations import Operation, OperationError, OperationLog
from gpu_manager.orchestrator.reconfig import ReloadResult, UnitFactory, apply_inventory
from gpu_manager.planner import (
    ObservedState,
    Plan,
    PlannerInventory,
    PreparePhase,
    Prewarm,
    Refusal,
    Request,
    ServiceSpec,
    StartService,
    plan,
)
from gpu_manager.probe import DeviceSnapshot, Poller, Snapshot
from gpu_manager.state_store import StateStore
from gpu_manager.units import Event, EventBus, ServiceState, Unit

S = ServiceState
REFUSAL_CODES = frozenset({"unknown_service", "unknown_phase", "insufficient_vram",
                           "needed_by_phase", "cannot_sleep", "not_running",
                           "unmanaged_device"})
# Prewarmed services rank below everything: any start may preempt them.
PREWARM_PRIORITY = -(10**9)


class Orchestrator:
    def __init__(
        self, inventory: Inventory, units: dict[str, Unit], poller: Poller, lock: GpuLock,
        bus: EventBus, store: StateStore, *, lock_wait_s: float = 0.0,
        reclaim_timeout_s: float = 30.0, on_lock_change: Callable[[], None] | None = None,
        bounds: Bounds = DEFAULT,
    ) -> None:
        self.inventory = inventory
        self.bounds = bounds
        self.pinv = PlannerInventory.from_inventory(inventory)
        self.units = units  # written only by apply_inventory (under _serial)
        self.poller = poller
        self.lock = lock
        self.bus = bus
        self.store = store
        self.lock_wait_s = lock_wait_s
        self.reclaim_timeout_s = reclaim_timeout_s
        self.ops = OperationLog()
        self.ledger = Ledger()
        self.current_phase: int | None = store.phase
        self.redis_url: str | None = None
        self.http = httpx.AsyncClient(trust_env=False)
        self._serial = asyncio.Lock()
        self.keeper = LockKeeper(lock, on_lock_change)
        self.preemptions: dict[str, int] = {}
        self.executor = Executor(self)
        self._pid_reads: dict[tuple[str, int], asyncio.Future[list[int]]] = {}
        # False from the start of shutdown: no restarts, no new leases.
        self.accepting = True
        self.followups = Followups(self)  # prewarm, wake when free
        self._current: tuple[Operation, asyncio.Task[Any]] | None = None  # the one running

    # -- observation --------------------------------------------------------------------------
    @property
    def device(self) -> DeviceSnapshot | None:
        return self.poller.latest.device(self.inventory.gpu.device)

    @property
    def busy(self) -> bool:
        return self._serial.locked()

    async def read_pids(self, name: str) -> tuple[frozenset[int], str | None]:
        """The unit's pids now, bounded; on failure the last known ones and the error.

        A read still running (a /proc walk stuck on a process in the driver, a `docker top`
        the engine never answers) is waited on again rather than joined by another: the
        threads behind these reads are never piled up."""
        unit = self.units.get(name)
        if unit is None:
            return frozenset(), "no such unit (removed)"
        key = (name, id(unit.driver))
        read = self._pid_reads.get(key)
        if read is None or read.done():
            read = self._pid_reads[key] = asyncio.ensure_future(unit.driver.pids())
            read.add_done_callback(retrieve)
        try:
            async with asyncio.timeout(self.bounds.pids_s):
                return frozenset(await asyncio.shield(read)), None
        except TimeoutError:
            error = f"no answer within {self.bounds.pids_s:g}s"
        except Exception as exc:  # DriverError from an unreachable engine, or a bug
            error = f"{type(exc).__name__}: {exc}"
        logger.warning(f"{name}: cannot read its pids: {error}")
        return frozenset(self.ledger.view().unit_pids.get(name, ())), error

    async def refresh_pids(self, prune: bool = True) -> None:
        """Re-read every unit's pids. `prune`: also forget releases the GPU has completed;
        off while a plan runs, whose starts settle their own evidence (one start must not
        drop the release another start still waits on)."""
        units = [(n, u) for n, u in list(self.units.items()) if u.holds_gpu]
        results = await asyncio.gather(*(self.read_pids(n) for n, _ in units))
        fresh = {n: tuple(sorted(p)) for (n, _), (p, err) in zip(units, results, strict=True)
                 if err is None}
        errors = {n: err for (n, _), (_, err) in zip(units, results, strict=True)
                  if err is not None}
        self.ledger.set_pids(fresh, errors)
        if prune:
            self.prune(self.poller.latest)
        for name, unit in list(self.units.items()):
            residual = unit.cfg.residual_mb
            snap = self.poller.latest
            if unit.state != S.SLEEPING or residual is None \
                    or name in self.ledger.view().releasing or snap.taken_at <= unit.since_mono:
                # a sleep still being confirmed, or a reading from before it fell asleep
                continue
            mb = self.measured(name, snap)
            if mb is not None and mb > residual:
                # Ollama and ComfyUI load the model again for the next request on their own
                await unit.woke(f"holds {mb} MB, more than its {residual} MB residual")

    def prune(self, snap: Snapshot, only: list[str] | None = None) -> None:
        self.ledger.prune_releasing(listed_pids(snap, self.cards), psutil.pid_exists,
                                    self.reclaim_timeout_s, only)

    @property
    def cards(self) -> tuple[int, ...]:
        """The managed GPUs' indices, the primary first."""
        return tuple(d.index for d in self.inventory.gpu.managed)

    def cards_of(self, name: str) -> tuple[int, ...]:
        """The cards `name` runs (or last ran) on: its recorded ones with several cards,
        else the primary card (one GPU, or a record from a one-GPU daemon)."""
        gpu = self.inventory.gpu
        unit = self.units.get(name)
        return unit.devices if gpu.several and unit is not None and unit.devices \
            else (gpu.device,)

    def measured(self, name: str, snap: Snapshot | None = None,
                 device: int | None = None) -> int | None:
        """MB the GPU attributes to `name`'s pids (on `device`, or on all managed cards);
        None when it cannot tell."""
        pids = set(self.ledger.view().unit_pids.get(name, ()))
        found = held_on(snap or self.poller.latest,
                        (device,) if device is not None else self.cards, pids)
        if not found or any(mb is None for mb in found):
            return None
        return sum(mb for mb in found if mb is not None)

    def observed(self) -> ObservedState:
        """The planner's view, from cached pids and the latest snapshot; no side effects."""
        gpu = self.inventory.gpu
        dev = self.device
        books = self.ledger.view()
        units = list(self.units.items())
        running: dict[str, int | None] = {
            n: self.measured(n) for n, u in units if u.holds_gpu and u.state != S.SLEEPING}
        sleeping = {n: self.measured(n) for n, u in units if u.state == S.SLEEPING}
        for name, mb in list(running.items()):
            if mb is None and name not in self.inventory.services:
                # removed by a reload but still running: the planner has no declared size
                # for it, so give it its last one (degraded mode measures nothing)
                running[name] = self.units[name].cfg.vram_mb
        running.update({n: None for n, lease in books.leases.items() if lease.active})
        total = dev.total_mb if dev is not None and dev.total_mb is not None else gpu.total_mb
        foreign = 0
        if dev is not None and dev.used_mb is not None:
            managed = sum(mb or 0 for mb in (*running.values(), *sleeping.values()))
            # A sleeper's memory is still its pids' (measured above), not also releasing.
            releasing = sum(r.mb for r in books.releasing.values() if r.must_exit)
            foreign = max(0, dev.used_mb - managed - releasing)
        unready = frozenset(n for n in running if n in self.units
                            and self.units[n].state == S.FAILED)
        if gpu.several:
            return observed_cards(self, books, running, sleeping, unready)
        return ObservedState(total or 0, running, gpu.reserve_mb, foreign, self.current_phase,
                             sleeping, unready)

    def planner_inventory(self) -> PlannerInventory:
        """The inventory as the planner must see it now: client leases as unstoppable
        services, prewarmed ones below every priority, and each unit's sleep ability as its
        running instance has it (a reload that adds or drops `sleep:` applies at its next
        start)."""
        leases = self.ledger.view().leases
        prewarmed = self.followups.live()
        live = {n: u.cfg.residual_mb for n, u in list(self.units.items())
                if n in self.pinv.services and self.pinv.services[n].residual_mb
                != u.cfg.residual_mb}
        if not leases and not prewarmed and not live:
            return self.pinv
        services = dict(self.pinv.services)
        for name, residual in live.items():
            services[name] = dataclasses.replace(services[name], residual_mb=residual)
        for name in prewarmed & set(services):
            services[name] = dataclasses.replace(services[name], priority=PREWARM_PRIORITY,
                                                 preemptible=True)
        for name, lease in leases.items():
            services[name] = ServiceSpec(
                name, lease.vram_mb, lease.priority, preemptible=False, stoppable=False,
                devices=None if lease.device is None else (lease.device,))
        return PlannerInventory(services, self.pinv.phases)

    async def dry_run(self, request: Request) -> Plan | Refusal:
        await self.refresh_pids()
        return plan(self.planner_inventory(), self.observed(), request)

    def gpu_state(self) -> dict[str, str]:
        return {n: u.state.value for n, u in list(self.units.items())}

    def owner(self, request: Request) -> str:
        """Who the GPU goes to, as the pause protocol names it (`gpu_owner`, `gpu_state`)."""
        if isinstance(request, StartService):
            lease = self.ledger.lease(request.name)
            return lease.requester if lease is not None else request.name
        if isinstance(request, PreparePhase):
            return f"phase {request.phase}"
        return "gpu-manager"

    # -- the books' other writers go through here ---------------------------------------------
    def set_phase(self, phase: int | None) -> None:
        self.current_phase = phase
        self.store.set_phase(phase)

    def count_preemption(self, name: str) -> None:
        self.preemptions[name] = self.preemptions.get(name, 0) + 1

    # -- execution ----------------------------------------------------------------------------
    async def execute(self, op: Operation) -> Operation:
        """Run `op` to its end; raises OperationError (or a lock error) when it fails."""
        self.ops.add(op)
        self.bus.publish(Event("operation", None, {"id": op.id, "status": "queued"}))
        running = self._current
        if running is not None and isinstance(running[0].request, Prewarm) \
                and not isinstance(op.request, Prewarm):
            # a prewarm is a guess: it gives way to any real request (what it started goes on
            # starting in its unit; the request's plan sees it and waits for it if it wants it)
            logger.info(f"{running[0].label} gives way to {op.label}")
            running[0].superseded_by = op.label
            running[1].cancel()
        try:
            await self._serial.acquire()
        except asyncio.CancelledError:  # cancelled while queued (shutdown): it ends here
            op.finish("failed", {"error": "cancelled", "detail": "cancelled while queued"})
            raise
        async with Held(self._serial):
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
                if op.superseded_by is not None:
                    op.finish("failed", {"error": "superseded",
                                         "detail": f"gave way to {op.superseded_by}"})
                else:
                    op.finish("failed", {"error": "internal", "detail": repr(exc)})
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
        return op

    async def _execute(self, op: Operation) -> None:
        bound = self.lock_wait_s + self.bounds.lock_io_s
        try:
            async with asyncio.timeout(bound):
                lease = await self.keeper.hold(op.label, self.lock_wait_s)
        except TimeoutError as exc:
            raise LockUnavailable(f"the lock backend did not answer within {bound:g}s") from exc
        try:
            await self.refresh_pids()
            result = plan(self.planner_inventory(), self.observed(), op.request)
            if isinstance(result, Refusal):
                raise refusal_error(result)
            op.set_plan(result)
            bound = op.deadline_s = plan_bound(self, result)
            try:
                async with asyncio.timeout(bound):
                    await self.executor.run(op, lease, result)
            except TimeoutError as exc:
                raise OperationError(
                    "deadline_exceeded", f"the plan did not finish within {bound:g}s (the sum "
                    "of its steps' deadlines)", gpu_state=self.gpu_state()) from exc
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
        for read in self._pid_reads.values():  # a read still hung in a driver: not awaited
            read.cancel()
        await self.http.aclose()

    # -- the inventory, swapped through its owners --------------------------------------------
    async def apply_inventory(self, new: Inventory, make: UnitFactory) -> ReloadResult:
        """Swap in a new inventory under the same serialisation as transitions (see
        reconfig.apply_inventory, which takes the transition lock)."""
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
            if info.holder is not None and not self.keeper.holders:
                return False  # someone outside the daemon (legacy code) owns the GPU
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

