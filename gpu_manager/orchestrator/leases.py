"""Client leases: a client holds N MB (or the whole GPU) for a while.

A lease is VRAM the planner counts like a running service that it may never stop; acquiring
one is a start, so it may preempt lower-priority services. Requests wait up to their timeout
in a fair queue: by priority, then arrival, and only the head of the queue is tried, so a
stream of small requests cannot starve a large, more important one. A lease expires after its
TTL unless renewed, so a crashed client cannot hold the GPU forever.

An acquire is bounded and idempotent:
- its `timeout_ms` covers everything: the queue, the serial lane, the plan and the reclaim
  wait. When it passes, the attempt in flight is cancelled (what its plan already stopped
  stays stopped; the lease is never granted) and the client hears "timed out";
- a retry with the same session id (a client whose HTTP call timed out) joins the acquire in
  flight and gets its answer, instead of a refusal that left the first one to be granted to
  nobody;
- a release of a session whose acquire is still in flight cancels it.
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
from gpu_manager.orchestrator.deadlines import lock_call
from gpu_manager.orchestrator.holders import HOLDER_CHECK_S, orphaned, pid_created
from gpu_manager.orchestrator.lease_fit import card_budget, fit
from gpu_manager.orchestrator.ledger import ClientLease, LostLease, lease_name
from gpu_manager.orchestrator.operations import Operation, OperationError
from gpu_manager.planner import Plan, Refusal, StartService
from gpu_manager.units import Event

RETRY_S = 0.5  # re-try the head of the queue at least this often (foreign usage may drop)
CANCEL_WAIT_S = 1.0  # how long a timed-out attempt is given to unwind before we answer
UNCLAIMED_S = 5.0  # a grant no caller received: how long before it expires


@dataclass(order=True)
class _Waiter:
    key: tuple[int, int]
    session_id: str = field(compare=False)


@dataclass(frozen=True)
class AcquireResult:
    lease: ClientLease | None
    error: str | None
    wait_ms: int
    code: str = "ok"  # ok, timeout, unavailable, invalid, too_large, cancelled, refused


@dataclass
class _Acquire:
    """One session's acquire in flight: what it asked for, until when, and its attempt."""

    lease: ClientLease
    t0: float
    deadline: float  # time.monotonic()
    task: asyncio.Task[AcquireResult] | None = None
    attempt: asyncio.Task[ClientLease | tuple[str, str]] | None = None
    op: Operation | None = None  # the attempt's operation, once it has one
    # Given up before it was granted: (code, why): released by its client, or shutdown.
    abandoned: tuple[str, str] | None = None
    # False: no waiting for room: a grant that cannot be had now (its plan refused, or
    # others queued first) is refused at once (a fleet then places it elsewhere); a plan
    # that can run still runs to its end within the timeout.
    wait: bool = True


class LeaseManager:
    def __init__(self, orch: Orchestrator, cfg: LeaseConfig) -> None:
        self.orch = orch
        self.cfg = cfg
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()
        self._pending: dict[str, _Acquire] = {}

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

    def lost(self, session_id: str) -> LostLease | None:
        return self.orch.ledger.lost(lease_name(session_id))

    def scale(self, client_priority: int) -> int:
        return self.cfg.immediate_priority if client_priority == 1 else self.cfg.background_priority

    def _notify(self) -> None:
        self._changed.set()

    async def acquire(self, session_id: str, requester: str, client_priority: int,
                      timeout_ms: int, vram_mb: int | None = None, ttl_s: float | None = None,
                      metadata: dict[str, Any] | None = None, legacy: bool = False,
                      device: int | None = None, pid: int | None = None,
                      max_preempt: int | None = None, wait: bool = True) -> AcquireResult:
        t0 = time.monotonic()
        existing = self.get(session_id)
        if existing is not None:  # a retry of a request that already succeeded: idempotent
            return AcquireResult(self.renew(session_id) or existing, None, 0)
        pending = self._pending.get(session_id)
        if pending is not None and pending.task is not None:
            # A retry while the first request is in flight (its client timed out and asked
            # again): the same acquire, and its answer. Shielded: this caller giving up
            # does not cancel it for the first one.
            return await asyncio.shield(pending.task)
        if not self.orch.accepting:
            return AcquireResult(None, "the daemon is shutting down", 0, "unavailable")
        gpu = self.orch.inventory.gpu
        if device is not None and gpu.gpu(device) is None:
            known = ", ".join(str(c) for c in self.orch.cards)
            return AcquireResult(None, f"device {device} is not managed by this daemon "
                                 f"(devices: {known})", 0, "invalid")
        budget = card_budget(self.orch, device)
        mb = vram_mb if vram_mb is not None else self.cfg.default_vram_mb
        mb = budget if mb is None else mb
        if 0 < budget < mb:
            # no wait can make it fit: say so now rather than at the end of the timeout
            return AcquireResult(None, f"{mb} MB is more than this GPU can ever give "
                                 f"({budget} MB: its total less the reserve)", 0, "too_large")
        created = None
        if pid is not None:
            try:
                async with asyncio.timeout(self.orch.bounds.pids_s):
                    created = await asyncio.to_thread(pid_created, pid)
            except TimeoutError:
                created = None
            if created is None:
                logger.info(f"lease {session_id}: pid {pid} is no process of this host (in a "
                            "container?); its memory is counted by the rule for leases "
                            "without a pid")
        ttl = min(ttl_s or (self.cfg.legacy_ttl_s if legacy else self.cfg.default_ttl_s),
                  self.cfg.max_ttl_s)
        lease = ClientLease(session_id, requester, self.scale(client_priority), client_priority,
                            mb, ttl, legacy, dict(metadata or {}), device=device,
                            pid=pid if created is not None else None, pid_created=created,
                            max_preempt=max_preempt)
        a = _Acquire(lease, t0, t0 + min(timeout_ms / 1000, self.cfg.max_wait_s), wait=wait)
        a.task = asyncio.create_task(self._run(a), name=f"acquire-{session_id}")
        self._pending[session_id] = a
        a.task.add_done_callback(lambda _: self._forget(session_id, a))
        return await asyncio.shield(a.task)

    async def plan(self, client_priority: int, vram_mb: int | None,
                   device: int | None = None) -> Plan | Refusal | str:
        """What an acquire would do now, nothing reserved (see `lease_fit.fit`)."""
        return await fit(self.orch, self.cfg, self.scale(client_priority), vram_mb, device,
                         f"plan-{next(self._seq)}")

    def _forget(self, session_id: str, a: _Acquire) -> None:
        if self._pending.get(session_id) is a:
            del self._pending[session_id]
        if a.task is not None and not a.task.cancelled():
            a.task.exception()  # retrieved (it is answered to the callers)

    async def _run(self, a: _Acquire) -> AcquireResult:
        lease, t0 = a.lease, a.t0
        session_id, requester, mb = lease.session_id, lease.requester, lease.vram_mb
        waiter = _Waiter((-lease.priority, next(self._seq)), session_id)
        self._queue.append(waiter)
        self._queue.sort()
        last = "waiting for the GPU"
        announced = False  # a `waiting` event went out: its end is announced too

        def tell(status: str, **more: Any) -> None:
            self.orch.bus.publish(Event("lease", None, {
                "session_id": session_id, "requester": requester, "status": status,
                "vram_mb": mb, **more}))

        result: AcquireResult | None = None
        try:
            while True:
                if not self.orch.accepting:  # shutting down: no new attempt
                    self._abandon(a, "unavailable", "the daemon is shutting down")
                if a.abandoned is None and self._queue[0] is waiter:
                    outcome = await self._attempt(a)
                    granted = self.get(session_id)
                    if granted is not None and a.abandoned is not None:
                        await self.release(session_id, "cancelled")  # given up meanwhile
                    elif granted is not None:
                        tell("acquired")
                        return AcquireResult(granted, None, self._ms(t0))
                    elif isinstance(outcome, ClientLease):  # granted, and released already
                        result = AcquireResult(None, "released by its client as soon as it "
                                               "was granted", self._ms(t0), "cancelled")
                        return result
                    if isinstance(outcome, tuple):
                        code, last = outcome
                        if code == "unavailable" or not a.wait:
                            result = AcquireResult(None, last, self._ms(t0), code)
                            return result
                elif not a.wait and a.abandoned is None:
                    result = AcquireResult(None, "others are waiting for this GPU first",
                                           self._ms(t0), "refused")
                    return result
                if a.abandoned is not None:
                    code, why = a.abandoned
                    result = AcquireResult(None, why, self._ms(t0), code)
                    return result
                left = a.deadline - time.monotonic()
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

    async def _attempt(self, a: _Acquire) -> ClientLease | tuple[str, str] | None:
        """One try of the head of the queue, within what is left of the acquire's time; at
        the deadline (or a release by the client) the try is cancelled: None."""
        attempt = a.attempt = asyncio.create_task(self._try(a))
        try:
            await asyncio.wait({attempt}, timeout=max(0.0, a.deadline - time.monotonic()))
            if not attempt.done():
                self._cancel_attempt(a, ("timeout", "the acquire's timeout passed"))
                await asyncio.wait({attempt}, timeout=CANCEL_WAIT_S)
            if attempt.done() and not attempt.cancelled():
                return attempt.result()
            return None  # cancelled: at the deadline, or by a release
        finally:
            a.attempt = None
            if not attempt.done():  # we are cancelled ourselves (shutdown): so is it
                attempt.cancel()

    @staticmethod
    def _cancel_attempt(a: _Acquire, why: tuple[str, str]) -> None:
        if a.op is not None and not a.op.done:
            a.op.cancelled_because = why
        if a.attempt is not None:
            a.attempt.cancel()

    @staticmethod
    def _ms(t0: float) -> int:
        return int((time.monotonic() - t0) * 1000)

    async def _try(self, a: _Acquire) -> ClientLease | tuple[str, str]:
        """Grant the lease now if a plan allows it (the active lease); else (code, why not)."""
        orch, lease = self.orch, a.lease
        if not orch.ledger.add_pending(lease):  # the planner sees its size and priority
            existing = orch.ledger.lease(lease.name)
            if existing is not None and existing.active:
                return existing
            return "refused", f"session {lease.session_id!r} is already being acquired"
        held = False
        try:
            plan = await orch.dry_run(StartService(lease.name, lease.max_preempt))
            if not isinstance(plan, Plan):
                return "refused", plan.message
            # The daemon owns the GPU lock for as long as the lease is held, so legacy code
            # taking gpu_mutex sees the GPU as owned; taken before the transition, kept after.
            await lock_call("acquire", orch.keeper.hold(lease.name), orch.bounds.lock_io_s)
            held = True
            a.op = Operation(StartService(lease.name, lease.max_preempt))
            await orch.execute(a.op)
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

    def answered(self, session_id: str, received: bool) -> None:
        """An acquire's caller was answered with its grant (`received`), or had gone. A
        grant every caller missed expires within UNCLAIMED_S, said so in the log; one that
        any caller got (a retry joined the same acquire) keeps its TTL."""
        name = lease_name(session_id)
        if received:
            self.orch.ledger.renew(name)
        elif self.orch.ledger.unclaimed(name, UNCLAIMED_S) is not None:
            logger.warning(f"lease {session_id}: granted after its client left; it expires "
                           f"unclaimed within {UNCLAIMED_S:g}s unless a client renews it")

    async def release(self, session_id: str, why: str = "released") -> ClientLease | None:
        """End the session's lease; a session whose acquire is still in flight has it
        cancelled (None is returned: there was no lease)."""
        lease = self.orch.ledger.release(lease_name(session_id))
        if lease is None:
            pending = self._pending.get(session_id)
            if pending is not None:
                self._abandon(pending, "cancelled", f"{why} by its client before it was "
                              "granted")
            return None
        await self._drop_lock(lease.name)
        self.orch.bus.publish(Event("lease", None, {"session_id": session_id,
                                                    "requester": lease.requester,
                                                    "status": why}))
        self._notify()
        self.orch.followups.background(self.orch.followups.wake_when_free, "wake-when-free")
        return lease

    def in_flight(self, session_id: str) -> bool:
        return session_id in self._pending

    def _abandon(self, a: _Acquire, code: str, why: str) -> None:
        if a.abandoned is None:
            a.abandoned = (code, why)
            self._cancel_attempt(a, (code, why))
            self._notify()

    def abandon_all(self, why: str = "the daemon is shutting down") -> None:
        """Shutdown: every acquire in flight ends now, answered `unavailable`."""
        for a in list(self._pending.values()):
            self._abandon(a, "unavailable", why)

    async def close(self, why: str = "the daemon is shutting down") -> None:
        """Shutdown: abandon every acquire in flight and wait (bounded) for them to end."""
        self.abandon_all(why)
        tasks = [a.task for a in self._pending.values() if a.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2 * CANCEL_WAIT_S)

    async def expire_loop(self) -> None:
        """Run by the daemon's supervisor: take back leases whose TTL ran out, and those
        whose client process (the pid its acquire gave) has exited: a task killed with its
        host's Ray node leaves no lease behind for its TTL."""
        checked = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            for lease in self.orch.ledger.expired(time.monotonic()):
                logger.warning(f"lease {lease.session_id} of {lease.requester} expired after "
                               f"{lease.ttl_s:g}s without renewal; taking the GPU back")
                await self.release(lease.session_id, "expired")
            if time.monotonic() - checked >= HOLDER_CHECK_S:
                checked = time.monotonic()
                for lease in await orphaned(self.active, self.orch.bounds.pids_s):
                    logger.warning(f"lease {lease.session_id} of {lease.requester}: its process "
                                   f"{lease.pid} has exited; taking the GPU back")
                    await self.release(lease.session_id, "holder_exited")

