"""The orchestrator: one transition at a time per GPU, under the GPU lock, step by step.

For each request: take the local queue (FIFO), take the GPU lock (423 if someone else holds
it), observe, plan (pure), then stop -> wait for reclaim by evidence -> start -> wait ready.
The lock is held until the last start, so the VRAM the stops free stays with this request.
Reclaim evidence: the stopped units' pids are gone from the probe's process list (or dead)
AND free memory covers the next start plus the reserve, read in the probe's fast mode.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from loguru import logger

from gpu_manager.config import Inventory
from gpu_manager.lock import GpuLock, Lease, LockHeld, LockLost, LockUnavailable
from gpu_manager.lock.keeper import LockKeeper
from gpu_manager.orchestrator.operations import Operation, OperationError, OperationLog
from gpu_manager.planner import (
    ObservedState,
    Plan,
    PlannerInventory,
    PreparePhase,
    Refusal,
    Request,
    ServiceSpec,
    StartService,
    StopAll,
    StopService,
    plan,
)
from gpu_manager.probe import DeviceSnapshot, Poller, Snapshot
from gpu_manager.state_store import StateStore
from gpu_manager.units import HOLDS_GPU, Event, EventBus, Unit, strategies

REFUSAL_CODES = frozenset({"unknown_service", "unknown_phase", "insufficient_vram",
                           "needed_by_phase"})


@dataclass
class Releasing:
    """VRAM of a stopped unit that the GPU may not have handed back yet."""

    pids: frozenset[int]
    mb: int
    since: float
    # Evicted or paused: the process lives on, so only free memory is evidence.
    must_exit: bool = True


@dataclass
class ClientLease:
    """VRAM a client holds for a while: counted by the planner, never stopped by it."""

    session_id: str
    requester: str
    priority: int
    client_priority: int
    vram_mb: int
    ttl_s: float
    expires: float  # time.monotonic()
    legacy: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    active: bool = False
    acquired_at: float | None = None  # wall clock

    @property
    def name(self) -> str:
        return f"lease:{self.session_id}"


class Orchestrator:
    def __init__(
        self, inventory: Inventory, units: Mapping[str, Unit], poller: Poller, lock: GpuLock,
        bus: EventBus, store: StateStore, *, lock_wait_s: float = 0.0,
        reclaim_timeout_s: float = 30.0, on_lock_change: Callable[[], None] | None = None,
    ) -> None:
        self.inventory = inventory
        self.pinv = PlannerInventory.from_inventory(inventory)
        self.units = units
        self.poller = poller
        self.lock = lock
        self.bus = bus
        self.store = store
        self.lock_wait_s = lock_wait_s
        self.reclaim_timeout_s = reclaim_timeout_s
        self.ops = OperationLog()
        self.current_phase: int | None = store.phase
        self.unit_pids: dict[str, list[int]] = {}
        self.releasing: dict[str, Releasing] = {}
        self.leases: dict[str, ClientLease] = {}  # by name, pending and active
        # Units that run but hold no VRAM: evicted (Ollama) or paused, by who made them so.
        self.idle: dict[str, str] = {}
        self.redis_url: str | None = None
        self._http = httpx.AsyncClient(trust_env=False)
        self._serial = asyncio.Lock()
        self.keeper = LockKeeper(lock, on_lock_change)
        self.preemptions: dict[str, int] = {}
        self._last_stop_at = 0.0

    # -- observation (no I/O but the pid refresh) ---------------------------------------------
    @property
    def device(self) -> DeviceSnapshot | None:
        return self.poller.latest.device(self.inventory.gpu.device)

    async def refresh_pids(self) -> None:
        fresh: dict[str, list[int]] = {}
        for name, unit in self.units.items():
            if unit.state in HOLDS_GPU:
                fresh[name] = await unit.driver.pids()
        self.unit_pids = fresh
        self._update_bookkeeping()

    def measured(self, name: str, snap: Snapshot | None = None) -> int | None:
        dev = (snap or self.poller.latest).device(self.inventory.gpu.device)
        if dev is None or dev.processes is None:
            return None
        pids = set(self.unit_pids.get(name, ()))
        found = [p.used_mb for p in dev.processes if p.pid in pids]
        if not found or any(mb is None for mb in found):
            return None
        return sum(mb for mb in found if mb is not None)

    def _prune_releasing(self, dev: DeviceSnapshot | None) -> None:
        listed = {p.pid for p in dev.processes} if dev is not None and dev.processes else set()
        for name, rel in list(self.releasing.items()):
            known_list = dev is not None and dev.processes is not None
            alive = any(psutil.pid_exists(pid) for pid in rel.pids)
            if not (rel.pids & listed) and (known_list or not alive):
                del self.releasing[name]
            elif time.monotonic() - rel.since > self.reclaim_timeout_s:
                del self.releasing[name]  # stop waiting on it; what is left shows as foreign

    def _update_bookkeeping(self) -> None:
        """Forget releases the GPU has completed, and evicted services that reloaded."""
        self._prune_releasing(self.device)
        for name, kind in list(self.idle.items()):
            mb = self.measured(name)
            declared = self.inventory.services[name].vram_mb
            if kind == "evicted" and mb is not None and mb > declared // 10:
                del self.idle[name]  # it loaded a model again on its own: it holds VRAM

    def observed(self) -> ObservedState:
        """The planner's view, from cached pids and the latest snapshot; no side effects,
        so /gpu/status may call it on every request."""
        gpu = self.inventory.gpu
        dev = self.device
        running = {n: self.measured(n) for n, u in self.units.items()
                   if u.state in HOLDS_GPU and n not in self.idle}
        running.update({n: None for n, lease in self.leases.items() if lease.active})
        total = dev.total_mb if dev is not None and dev.total_mb is not None else gpu.total_mb
        foreign = 0
        if dev is not None and dev.used_mb is not None:
            managed = sum(mb or 0 for mb in running.values())
            releasing = sum(r.mb for r in self.releasing.values())
            foreign = max(0, dev.used_mb - managed - releasing)
        return ObservedState(total or 0, running, gpu.reserve_mb, foreign, self.current_phase)

    def planner_inventory(self) -> PlannerInventory:
        if not self.leases:
            return self.pinv
        services = dict(self.pinv.services)
        for name, lease in self.leases.items():
            services[name] = ServiceSpec(name, lease.vram_mb, lease.priority, preemptible=False,
                                         stoppable=False)
        return PlannerInventory(services, self.pinv.phases)

    async def dry_run(self, request: Request) -> Plan | Refusal:
        await self.refresh_pids()
        return plan(self.planner_inventory(), self.observed(), request)

    # -- execution ----------------------------------------------------------------------------
    async def execute(self, op: Operation) -> Operation:
        """Run `op` to its end; raises OperationError (or a lock error) when it fails."""
        self.ops.add(op)
        self.bus.publish(Event("operation", None, {"id": op.id, "status": "queued"}))
        async with self._serial:
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
                op.finish("failed", {"error": "internal", "detail": repr(exc)})
                raise
            else:
                op.finish("succeeded")
            finally:
                self.store.set_operation(op.id, None)
                self.bus.publish(Event("operation", None, op.as_dict()))
                why = f" ({op.error})" if op.error else ""
                took = time.monotonic() - t0
                logger.bind(op=op.id, status=op.status, duration_s=took).info(
                    f"operation {op.label}: {op.status} in {took:.3f}s{why}")
        return op

    async def _execute(self, op: Operation) -> None:
        lease = await self.keeper.hold(op.label, self.lock_wait_s)
        try:
            await self.refresh_pids()
            result = plan(self.planner_inventory(), self.observed(), op.request)
            if isinstance(result, Refusal):
                extra = {} if result.code != "insufficient_vram" else {
                    "short_mb": result.short_mb,
                    "blockers": [{"name": b.name, "mb": b.mb, "reason": b.reason}
                                 for b in result.blockers]}
                raise OperationError(result.code, result.message, **extra)
            op.set_plan(result)
            for record, step in zip(op.steps, result.steps, strict=True):
                if lease.is_lost():  # the renewal task saw it go: abort before the next step
                    await lease.check()
                record.status, record.started_at = "running", time.time()
                self.bus.publish(Event("step", step.service, {"op": op.id, **vars(record)}))
                t0 = time.monotonic()
                try:
                    if step.action == "stop":
                        # A stop the user asked for is a stop; one the plan needs for room may
                        # use the service's gentler strategy (evict, pause).
                        soft = not isinstance(op.request, StopService | StopAll)
                        record.detail = await self._stop(step.service, step.reason,
                                                         step.preemption, soft,
                                                         self._owner(op.request))
                    else:
                        record.reclaim_wait_s = await self._start(step.service, step.mb, lease)
                except BaseException as exc:
                    record.status = "failed"
                    record.detail = str(exc)
                    raise
                finally:
                    record.duration_s = time.monotonic() - t0
                if record.status != "failed":
                    record.status = "done"
                logger.bind(service=step.service, op=op.id, action=step.action,
                            reason=step.reason, duration_s=record.duration_s,
                            preemption=step.preemption).info(
                    f"{step.action} {step.service} done in {record.duration_s:.3f}s "
                    f"({step.reason})" + (f"; {record.detail}" if record.detail else ""))
                self.bus.publish(Event("step", step.service, {"op": op.id, **vars(record)}))
            if isinstance(op.request, PreparePhase):
                self.current_phase = op.request.phase
                self.store.set_phase(self.current_phase)
            if result.steps:
                # One fresh poll, so /gpu/status read right after this answer shows the result.
                await self.poller.next_snapshot(timeout=2)
                await self.refresh_pids()
        finally:
            await self.keeper.drop(op.label)

    async def _stop(self, name: str, reason: str, preemption: bool, soft: bool,
                    requester: str) -> str | None:
        """Free `name`'s VRAM: evict or pause it when configured and allowed, else stop it."""
        unit = self.units[name]
        cfg = self.inventory.services[name]
        pids = frozenset(await unit.driver.pids())
        mb = max(cfg.vram_mb, self.measured(name) or 0)
        detail = None
        if preemption:
            self.preemptions[name] = self.preemptions.get(name, 0) + 1
        if soft and (cfg.evict is not None or cfg.preempt is not None):
            if cfg.evict is not None:
                ok, detail = await strategies.ollama_evict(cfg.evict, self._http)
            else:
                assert cfg.preempt is not None
                ok, detail = await strategies.pause(cfg.preempt, self.redis_url, requester,
                                                    requester, reason, self._http)
            if ok:
                self.idle[name] = "evicted" if cfg.evict is not None else "paused"
                self.releasing[name] = Releasing(pids, mb, time.monotonic(), must_exit=False)
                self._last_stop_at = time.monotonic()
                self.bus.publish(Event(self.idle[name], name, {"detail": detail}))
                return detail
            logger.warning(f"{name}: {detail}; falling back to a stop")
            detail = f"{detail}; stopped instead"
        result = await unit.stop(reason)
        if not result.ok:
            raise OperationError("stop_failed", f"could not stop {name}: {result.reason}",
                                 gpu_state=self.gpu_state())
        self.idle.pop(name, None)
        self.releasing[name] = Releasing(pids, mb, time.monotonic())
        self._last_stop_at = time.monotonic()
        self.unit_pids.pop(name, None)
        return detail

    async def _start(self, name: str, need_mb: int, lease: Lease) -> float:
        await lease.check()  # fencing: nobody took the lock since we did
        waited = await self._await_reclaim(name, need_mb)
        await lease.check()
        client = self.leases.get(name)
        if client is not None:  # a client lease: the VRAM is now theirs
            client.active, client.acquired_at = True, time.time()
            return waited
        if name in self.idle:  # evicted/paused: it reloads its model on its own
            await self._resume(name)
            return waited
        result = await self.units[name].ensure_ready()
        if not result.ok:
            # The unit has already stopped what it launched; say where that leaves the GPU.
            raise OperationError("start_failed", f"{name} did not become ready: {result.reason}",
                                 gpu_state=self.gpu_state())
        return waited

    async def _await_reclaim(self, name: str, need_mb: int) -> float:
        reserve = self.inventory.gpu.reserve_mb
        pending = frozenset().union(*(r.pids for r in self.releasing.values() if r.must_exit))

        def reclaimed(snap: Snapshot) -> bool:
            # Only a snapshot taken after the last stop is evidence: an older one may predate
            # the stopped service's allocation and "show" its memory as free.
            if snap.taken_at < self._last_stop_at:
                return False
            dev = snap.device(self.inventory.gpu.device)
            if dev is None or dev.lost:
                return False
            if dev.processes is not None:
                gone = not (pending & {p.pid for p in dev.processes})
            else:
                gone = not any(psutil.pid_exists(pid) for pid in pending)
            # Degraded (declared) mode knows no free memory: the planner's budget must do.
            room = dev.free_mb is None or dev.free_mb - reserve >= need_mb
            return gone and room

        t0 = time.monotonic()
        if not pending and reclaimed(self.poller.latest):
            return 0.0
        async with self.poller.fast():
            snap = await self.poller.wait_until(reclaimed, self.reclaim_timeout_s)
            soft = [n for n, r in self.releasing.items() if not r.must_exit and n in self.idle]
            if snap is None and soft:
                # Eviction/pause did not give the memory back: stop them, and say so.
                for n in soft:
                    logger.warning(f"{n}: VRAM not back after {self.idle[n]}; stopping it")
                    await self._stop(n, f"{self.idle[n]} did not free its VRAM", False,
                                     False, "reclaim")
                pending = frozenset().union(*(r.pids for r in self.releasing.values()
                                              if r.must_exit))
                snap = await self.poller.wait_until(reclaimed, self.reclaim_timeout_s)
        if snap is None:
            dev = self.device
            free = dev.free_mb if dev is not None else None
            raise OperationError(
                "reclaim_timeout",
                f"VRAM for {name} did not come back within {self.reclaim_timeout_s:g}s: "
                f"need {need_mb} MB + {reserve} MB reserve, {free} MB free; still listed: "
                f"{sorted(pending & {p.pid for p in (dev.processes or ())}) if dev else '?'}",
                gpu_state=self.gpu_state())
        self._prune_releasing(snap.device(self.inventory.gpu.device))
        return time.monotonic() - t0

    def _owner(self, request: Request) -> str:
        """Who the GPU goes to, as the pause protocol names it (`gpu_owner`, `gpu_state`)."""
        if isinstance(request, StartService):
            lease = self.leases.get(request.name)
            return lease.requester if lease is not None else request.name
        if isinstance(request, PreparePhase):
            return f"phase {request.phase}"
        return "gpu-manager"

    def gpu_state(self) -> dict[str, str]:
        return {n: self.idle.get(n, u.state.value) for n, u in self.units.items()}

    async def _resume(self, name: str) -> None:
        cfg = self.inventory.services[name]
        kind = self.idle.pop(name, None)
        if kind == "paused" and cfg.preempt is not None:
            ok, detail = await strategies.resume(cfg.preempt, self.redis_url, name, self._http)
            self.bus.publish(Event("resumed", name, {"ok": ok, "detail": detail}))
            if not ok:
                logger.warning(f"{name}: {detail}")

    async def resume_idle(self) -> None:
        """Give the GPU back to paused services that fit again (after a release)."""
        paused = [n for n, kind in self.idle.items() if kind == "paused"]
        if not paused or self._serial.locked():
            return
        async with self._serial:
            for name in paused:
                result = plan(self.planner_inventory(), self.observed(), StartService(name))
                if isinstance(result, Plan) and not result.stops:
                    await self._resume(name)

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- restart gate -------------------------------------------------------------------------
    async def restart_gate(self, name: str) -> bool:
        """May a crashed unit restart itself? Only when it fits without stopping anything and
        nobody holds the GPU lock; a restart never preempts."""
        if self._serial.locked():
            # A transition is in flight (it may be waiting on this very unit): do not queue
            # behind it from inside the unit's own loop; decline and say so.
            return False
        async with self._serial:
            info = await self.lock.info()
            if info.holder is not None and not self.keeper.holders:
                return False  # someone outside the daemon (legacy code) owns the GPU
            await self.refresh_pids()
            result = plan(self.planner_inventory(), self.observed(), StartService(name))
            return isinstance(result, Plan) and not result.stops
