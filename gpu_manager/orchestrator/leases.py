"""Client leases: a client holds N MB (or the whole GPU) for a while.

A lease is VRAM the planner counts like a running service that it may never stop; acquiring
one is a start, so it may preempt lower-priority services. Requests wait up to their timeout
in a fair queue: by priority, then arrival, and only the head of the queue is tried, so a
stream of small requests cannot starve a large, more important one. A lease expires after its
TTL unless renewed, so a crashed client cannot hold the GPU forever.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from gpu_manager.aio import wait_event
from gpu_manager.config import LeaseConfig
from gpu_manager.lock import LockHeld, LockLost, LockUnavailable
from gpu_manager.orchestrator.core import Orchestrator
from gpu_manager.orchestrator.executor import lock_call
from gpu_manager.orchestrator.ledger import ClientLease, lease_name
from gpu_manager.orchestrator.operations import Operation, OperationError
from gpu_manager.planner import Plan, StartService
from gpu_manager.units import Event

RETRY_S = 0.5  # re-try the head of the queue at least this often (foreign usage may drop)


@dataclass(order=True)
class _Waiter:
    key: tuple[int, int]
    session_id: str = field(compare=False)


@dataclass(frozen=True)
class AcquireResult:
    lease: ClientLease | None
    error: str | None
    wait_ms: int
    code: str = "ok"  # ok, timeout, unavailable, invalid, too_large


class LeaseManager:
    def __init__(self, orch: Orchestrator, cfg: LeaseConfig) -> None:
        self.orch = orch
        self.cfg = cfg
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    @property
    def active(self) -> list[ClientLease]:
        return self.orch.ledger.view().active_leases

    @property
    def waiting(self) -> list[str]:
        """Sessions whose acquire waits for room, first served first."""
        return [w.session_id for w in self._queue]

    def get(self, session_id: str) -> ClientLease | None:
        lease = self.orch.ledger.lease(lease_name(session_id))
        return lease if lease is not None and lease.active else None

    def scale(self, client_priority: int) -> int:
        return self.cfg.immediate_priority if client_priority == 1 else self.cfg.background_priority

    def _notify(self) -> None:
        self._changed.set()

    async def acquire(self, session_id: str, requester: str, client_priority: int,
                      timeout_ms: int, vram_mb: int | None = None, ttl_s: float | None = None,
                      metadata: dict[str, Any] | None = None,
                      legacy: bool = False, device: int | None = None) -> AcquireResult:
        t0 = time.monotonic()
        existing = self.get(session_id)
        if existing is not None:  # a retry of a request that already succeeded: idempotent
            return AcquireResult(self.renew(session_id) or existing, None, 0)
        if not self.orch.accepting:
            return AcquireResult(None, "the daemon is shutting down", 0, "unavailable")
        if self.orch.ledger.lease(lease_name(session_id)) is not None or any(
                w.session_id == session_id for w in self._queue):
            # a retry while the first request still waits: one acquire per session at once
            return AcquireResult(None, f"session {session_id!r} is already being acquired",
                                 0, "invalid")
        gpu = self.orch.inventory.gpu
        if device is not None and gpu.gpu(device) is None:
            known = ", ".join(str(c) for c in self.orch.cards)
            return AcquireResult(None, f"device {device} is not managed by this daemon "
                                 f"(devices: {known})", 0, "invalid")
        budget = self.card_budget(device)
        mb = vram_mb if vram_mb is not None else self.cfg.default_vram_mb
        mb = budget if mb is None else mb
        if 0 < budget < mb:
            # no wait can make it fit: say so now rather than at the end of the timeout
            return AcquireResult(None, f"{mb} MB is more than this GPU can ever give "
                                 f"({budget} MB: its total less the reserve)", 0, "too_large")
        ttl = min(ttl_s or (self.cfg.legacy_ttl_s if legacy else self.cfg.default_ttl_s),
                  self.cfg.max_ttl_s)
        lease = ClientLease(session_id, requester, self.scale(client_priority), client_priority,
                            mb, ttl, legacy, dict(metadata or {}), device=device)
        waiter = _Waiter((-lease.priority, next(self._seq)), session_id)
        self._queue.append(waiter)
        self._queue.sort()
        deadline = t0 + min(timeout_ms / 1000, self.cfg.max_wait_s)
        last = "waiting for the GPU"
        announced = False  # a `waiting` event went out: its end is announced too

        def tell(status: str, **more: Any) -> None:
            self.orch.bus.publish(Event("lease", None, {
                "session_id": session_id, "requester": requester, "status": status,
                "vram_mb": mb, **more}))

        result: AcquireResult | None = None
        try:
            while True:
                if self._queue[0] is waiter:
                    outcome = await self._try(lease)
                    if isinstance(outcome, ClientLease):
                        tell("acquired")
                        return AcquireResult(outcome, None, self._ms(t0))
                    code, last = outcome
                    if code == "unavailable":
                        result = AcquireResult(None, last, self._ms(t0), "unavailable")
                        return result
                left = deadline - time.monotonic()
                if left <= 0:
                    result = AcquireResult(None, f"timed out after {self._ms(t0)} ms: {last}",
                                           self._ms(t0), "timeout")
                    return result
                if not announced:  # the queue in status (and the dashboard) shows it now
                    announced = True
                    tell("waiting", reason=last)
                self._changed.clear()
                await wait_event(self._changed, min(left, RETRY_S))
        finally:
            self._queue.remove(waiter)
            self._notify()
            if announced and result is not None:
                tell(result.code, reason=result.error)
            elif announced and self.get(session_id) is None:
                tell("cancelled", reason="the request ended before the GPU had room")

    def card_budget(self, device: int | None) -> int:
        """The most one lease can get: the card's total less its reserve (`device`), or the
        largest card's (any)."""
        observed = self.orch.observed()
        if not observed.devices:  # one card
            return observed.total_mb - observed.reserve_mb
        return max((c.total_mb - c.reserve_mb for i, c in observed.devices.items()
                    if device is None or i == device), default=0)

    @staticmethod
    def _ms(t0: float) -> int:
        return int((time.monotonic() - t0) * 1000)

    async def _try(self, lease: ClientLease) -> ClientLease | tuple[str, str]:
        """Grant `lease` now if a plan allows it (the active lease); else (code, why not)."""
        orch = self.orch
        if not orch.ledger.add_pending(lease):  # the planner sees its size and priority
            existing = orch.ledger.lease(lease.name)
            if existing is not None and existing.active:
                return existing
            return "refused", f"session {lease.session_id!r} is already being acquired"
        held = False
        try:
            plan = await orch.dry_run(StartService(lease.name))
            if not isinstance(plan, Plan):
                return "refused", plan.message
            # The daemon owns the GPU lock for as long as the lease is held, so legacy code
            # taking gpu_mutex sees the GPU as owned; taken before the transition, kept after.
            await lock_call("acquire", orch.keeper.hold(lease.name), orch.bounds.lock_io_s)
            held = True
            await orch.execute(Operation(StartService(lease.name)))
        except OperationError as exc:
            why: tuple[str, str] = ("refused", exc.detail)
        except LockHeld as exc:
            why = ("refused", str(exc))
        except (LockUnavailable, LockLost) as exc:
            why = ("unavailable", str(exc))
        else:
            why = ("refused", "the lease was not activated")
        finally:
            granted = orch.ledger.lease(lease.name)
            if granted is None or not granted.active:
                orch.ledger.drop_pending(lease.name)
                if held:
                    await self._drop_lock(lease.name)
        # Activated, even if something after the activation failed (the fresh poll, the
        # pid refresh): the VRAM is the client's and it must hear so, not "refused".
        return granted if granted is not None and granted.active else why

    async def _drop_lock(self, name: str) -> None:
        try:
            await lock_call("release", self.orch.keeper.drop(name), self.orch.bounds.lock_io_s)
        except Exception as exc:  # Redis gone: the key expires by its TTL
            logger.opt(exception=exc).error(f"could not release the GPU lock for {name}: {exc}")

    def renew(self, session_id: str) -> ClientLease | None:
        return self.orch.ledger.renew(lease_name(session_id))

    async def release(self, session_id: str, why: str = "released") -> ClientLease | None:
        lease = self.orch.ledger.release(lease_name(session_id))
        if lease is None:
            return None
        await self._drop_lock(lease.name)
        self.orch.bus.publish(Event("lease", None, {"session_id": session_id,
                                                    "requester": lease.requester,
                                                    "status": why}))
        self._notify()
        self.orch.followups.background(self.orch.followups.wake_when_free, "wake-when-free")
        return lease

    async def expire_loop(self) -> None:
        """Run by the daemon's supervisor: take back leases whose TTL ran out."""
        while True:
            await asyncio.sleep(0.25)
            for lease in self.orch.ledger.expired(time.monotonic()):
                logger.warning(f"lease {lease.session_id} of {lease.requester} expired after "
                               f"{lease.ttl_s:g}s without renewal; taking the GPU back")
                await self.release(lease.session_id, "expired")
