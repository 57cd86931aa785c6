"""Run one plan: stop -> wait for reclaim by evidence -> start -> wait ready, each bounded.

Bounds, all derived from the inventory and settings: a unit answers a stop within its stop
timeout plus the kill grace, a start within its start timeout (plus the stops around it); a
preemption strategy within its own timeouts; the reclaim wait within `reclaim_timeout_s`;
lock calls within `bounds.lock_io_s` (all margins: gpu_manager/bounds.py). The caller
(`Orchestrator.execute`) adds an overall deadline as a backstop and always drops the GPU
lock, whatever happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import psutil
from loguru import logger

from gpu_manager.lock import Lease, LockUnavailable
from gpu_manager.orchestrator.ledger import Releasing
from gpu_manager.orchestrator.operations import Operation, OperationError, StepRecord
from gpu_manager.planner import Plan, PreparePhase, Refusal, Step, StopAll, StopService
from gpu_manager.probe import Snapshot
from gpu_manager.units import Event, IdleKind, strategies

if TYPE_CHECKING:
    from gpu_manager.orchestrator.core import Orchestrator


def strategy_bound(orch: Orchestrator, name: str) -> float:
    cfg = orch.inventory.services[name]
    if cfg.evict is not None:
        return cfg.evict.timeout_s * 4 + orch.bounds.strategy_margin_s  # /api/ps + unloads
    if cfg.preempt is not None:
        return (cfg.preempt.ack_timeout_s + cfg.preempt.freed_timeout_s + 5
                + orch.bounds.strategy_margin_s)
    return 0.0


def plan_bound(orch: Orchestrator, plan: Plan) -> float:
    """The longest a plan may take when every step uses its whole deadline."""
    b = orch.bounds
    total = b.lock_io_s * 4 + b.pids_s + 2.0 + 2.0  # lock checks, pid refresh, a fresh poll
    for step in plan.steps:
        unit = orch.units.get(step.service)
        if step.action == "stop" and unit is not None:
            total += unit.stop_bound_s + strategy_bound(orch, step.service) + b.pids_s
        elif step.action == "start":
            # a reclaim wait, a second one after soft releases fell back to stops, the start
            total += 2 * orch.reclaim_timeout_s + (unit.start_bound_s if unit else 0.0)
    return total


async def lock_call(what: str, aw: Awaitable[Any], bound: float) -> None:
    """A call to the lock backend under `bound`; expiry is LockUnavailable."""
    try:
        async with asyncio.timeout(bound):
            await aw
    except TimeoutError as exc:
        raise LockUnavailable(f"the lock backend did not answer {what} within "
                              f"{bound:g}s") from exc


class Executor:
    """Runs one plan as the graph the planner drew: every step is a task that waits for the
    steps it names in `after` (a start for the stops whose VRAM it needs), so independent
    stops run side by side, the starts of a phase run side by side, and a start that fits
    beside what still runs begins at once. After a failure nothing new begins; what already
    runs finishes (each under its own deadline), and the first failure is raised."""

    def __init__(self, orch: Orchestrator) -> None:
        self.orch = orch
        # Starts of this plan that passed their room check, and the MB each was granted: for
        # the rest of the plan a start beside them counts what they have not yet shown on
        # the GPU (the planner counts their declared size too). Set in the same synchronous
        # step as the room check that granted it, so no two starts can both see the same
        # free memory, whatever the awaits after it (a Redis fencing check yields).
        self._claims: dict[str, int] = {}
        self._failures: list[BaseException] = []
        self._began = 0.0
        self._fallbacks: dict[str, asyncio.Future[str | None]] = {}

    async def run(self, op: Operation, lease: Lease, result: Plan) -> None:
        orch = self.orch
        steps = result.steps
        finished = [asyncio.Event() for _ in steps]
        failures: list[BaseException] = []
        self._claims, self._failures, self._fallbacks = {}, failures, {}
        self._began = time.monotonic()

        async def one(i: int) -> None:
            step, record = steps[i], op.steps[i]
            try:
                for d in step.after:
                    await finished[d].wait()
                if failures or any(op.steps[d].status != "done" for d in step.after):
                    _skip(record)
                    return
                await self._step(op, lease, step, record,
                                 [steps[d].service for d in step.after])
            except _Skipped:
                _skip(record)
            except BaseException as exc:
                if record.status == "pending":  # cancelled (the plan's deadline) unbegun
                    _skip(record)
                failures.append(exc)
                raise
            finally:
                finished[i].set()

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(steps))]
        # One refresher for the plan (not one per waiting start): it keeps the claimants'
        # pids current, so their allocations count once, as used memory, not also as claim.
        refresher = asyncio.ensure_future(self._refresh_claimants())
        try:
            await asyncio.gather(*tasks, return_exceptions=True)  # cancelled with us
        finally:
            refresher.cancel()
        if failures:
            raise failures[0]
        if isinstance(op.request, PreparePhase):
            orch.set_phase(op.request.phase)
        if result.steps:
            # One fresh poll, so /gpu/status read right after this answer shows the result.
            await orch.poller.next_snapshot(timeout=2)
            await orch.refresh_pids()

    async def _step(self, op: Operation, lease: Lease, step: Step, record: StepRecord,
                    deps: list[str]) -> None:
        orch = self.orch
        if lease.is_lost():  # the renewal task saw it go: abort before the next step
            await lock_call("check", lease.check(), orch.bounds.lock_io_s)
        record.status, record.started_at = "running", time.time()
        orch.bus.publish(Event("step", step.service, {"op": op.id, **vars(record)}))
        t0 = time.monotonic()
        try:
            if step.action == "stop":
                # A stop the user asked for is a stop; one the plan needs for room may use
                # the service's gentler strategy (evict, pause).
                soft = not isinstance(op.request, StopService | StopAll)
                record.detail = await self.stop(step.service, step.reason, step.preemption,
                                                soft, orch.owner(op.request))
            else:
                record.reclaim_wait_s, record.detail = await self.start(
                    step.service, step.mb, lease, deps)
        except BaseException as exc:
            record.status = "failed"
            record.detail = str(exc) or type(exc).__name__
            raise
        finally:
            record.duration_s = time.monotonic() - t0
        record.status = "done"
        logger.bind(service=step.service, op=op.id, action=step.action,
                    reason=step.reason, duration_s=record.duration_s,
                    preemption=step.preemption).info(
            f"{step.action} {step.service} done in {record.duration_s:.3f}s "
            f"({step.reason})" + (f"; {record.detail}" if record.detail else ""))
        orch.bus.publish(Event("step", step.service, {"op": op.id, **vars(record)}))

    async def stop(self, name: str, reason: str, preemption: bool, soft: bool,
                   requester: str) -> str | None:
        """Free `name`'s VRAM: evict or pause it when configured and allowed, else stop it."""
        orch = self.orch
        unit = orch.units[name]
        cfg = orch.inventory.services[name]
        pids, pid_error = await orch.read_pids(name)
        mb = max(cfg.vram_mb, orch.measured(name) or 0)
        notes: list[str] = []
        if pid_error is not None:
            notes.append(f"pid list unavailable ({pid_error}): reclaim judged by free memory "
                         "alone")
        if preemption:
            orch.count_preemption(name)
        if soft and (cfg.evict is not None or cfg.preempt is not None):
            ok, detail = await self.release_softly(name, reason, requester)
            if ok:
                kind = IdleKind.EVICTED if cfg.evict is not None else IdleKind.PAUSED
                orch.ledger.mark_idle(name, kind)
                orch.ledger.released(name, Releasing(pids, mb, time.monotonic(),
                                                     must_exit=False,
                                                     pids_known=pid_error is None))
                orch.bus.publish(Event(kind.value, name, {"detail": detail}))
                return "; ".join([detail, *notes])
            logger.warning(f"{name}: {detail}; falling back to a stop")
            notes.insert(0, f"{detail}; stopped instead")
        result = await unit.stop(reason)
        if not result.ok:
            raise OperationError("stop_failed", f"could not stop {name}: {result.reason}",
                                 gpu_state=orch.gpu_state())
        orch.ledger.released(name, Releasing(pids, mb, time.monotonic(),
                                             pids_known=pid_error is None))
        return "; ".join(notes) or None

    async def release_softly(self, name: str, reason: str, requester: str) -> tuple[bool, str]:
        orch = self.orch
        cfg = orch.inventory.services[name]
        bound = strategy_bound(orch, name)
        try:
            async with asyncio.timeout(bound):
                if cfg.evict is not None:
                    return await strategies.ollama_evict(cfg.evict, orch.http)
                assert cfg.preempt is not None
                return await strategies.pause(cfg.preempt, orch.redis_url, requester,
                                              requester, reason, orch.http)
        except TimeoutError:
            return False, f"no answer from {name}'s release within {bound:g}s"
        except Exception as exc:  # a strategy must never take the transition down with it
            logger.opt(exception=exc).error(f"{name}: release strategy failed: {exc}")
            return False, f"release strategy failed: {type(exc).__name__}: {exc}"

    async def start(self, name: str, need_mb: int, lease: Lease,
                    deps: list[str] | None = None) -> tuple[float, str | None]:
        orch = self.orch
        # fencing: nobody took the lock since we did
        await lock_call("check", lease.check(), orch.bounds.lock_io_s)
        waited, note = await self.await_reclaim(name, need_mb, deps or [])  # claims on success
        launched = False
        try:
            await lock_call("check", lease.check(), orch.bounds.lock_io_s)
            if self._failures:  # a sibling failed while this one waited: begin nothing new
                raise _Skipped
            result = await self._launch(name, lease, waited, note)
            launched = True
            return result
        finally:
            if not launched:
                self._claims.pop(name, None)

    async def _launch(self, name: str, lease: Lease, waited: float,
                      note: str | None) -> tuple[float, str | None]:
        orch = self.orch
        if orch.ledger.lease(name) is not None:  # a client lease: the VRAM is now theirs
            orch.ledger.activate(name)
            return waited, note
        if orch.ledger.idle_kind(name) is not None:  # evicted/paused: wake it
            ok, detail = await orch.resume(name)
            if ok:
                return waited, note
            # It did not wake: its state is unknown, so stop it and start it cold (the VRAM
            # is already reserved for it), and say so.
            note = "; ".join(x for x in (note, f"{detail}; restarted instead") if x)
            stopped = await orch.units[name].stop(f"resume failed: {detail}")
            if not stopped.ok:
                raise OperationError("start_failed", f"{name} did not resume ({detail}) and "
                                     f"could not be stopped: {stopped.reason}",
                                     gpu_state=orch.gpu_state())
            orch.ledger.released(name, Releasing(frozenset(), 0, time.monotonic()))
        result = await orch.units[name].ensure_ready()
        if not result.ok:
            # The unit has already stopped what it launched; say where that leaves the GPU.
            raise OperationError("start_failed", f"{name} did not become ready: {result.reason}",
                                 gpu_state=orch.gpu_state())
        return waited, note

    def _claimed(self, but: str, snap: Snapshot) -> int:
        """MB that starts granted beside this one have not yet shown on the GPU (by what the
        snapshot attributes to their pids; their pids are refreshed while anyone waits)."""
        return sum(max(0, mb - (self.orch.measured(n, snap) or 0))
                   for n, mb in self._claims.items() if n != but)

    async def _refresh_claimants(self) -> None:
        """While the plan runs, keep the pids of the starts granted so far current, so their
        allocations count once (as used memory), not twice (also as claim). A failed
        refresh is logged and tried again: the claims then just stay whole (conservative)."""
        while True:
            if self._claims:
                try:
                    await self.orch.refresh_pids(prune=False)
                except Exception as exc:
                    logger.opt(exception=exc).error(f"pid refresh during a plan: {exc}")
            await asyncio.sleep(0.2)

    async def await_reclaim(self, name: str, need_mb: int,
                            deps: list[str]) -> tuple[float, str | None]:
        """Wait until the stops `deps` have given their VRAM back (their pids off the GPU's
        list) and free memory covers `need_mb` beside the claims of starts still launching;
        releases this start does not depend on are not waited for."""
        orch = self.orch
        gpu = orch.inventory.gpu

        def evidence() -> tuple[frozenset[int], list[str], float]:
            books = orch.ledger.view()
            rels = {n: books.releasing[n] for n in deps if n in books.releasing}
            pending = frozenset().union(*(r.pids for r in rels.values()
                                          if r.must_exit and r.pids_known))
            blind = [n for n, r in rels.items() if not r.pids_known]
            return pending, blind, max((r.since for r in rels.values()), default=0.0)

        pending, blind, since = evidence()
        since = max(since, self._began)  # room judged on data no older than this plan

        def reclaimed(snap: Snapshot) -> bool:
            # Only a snapshot taken after the stops it waits for is evidence: an older one
            # may predate a stopped service's allocation and "show" its memory as free.
            if snap.taken_at < since:
                return False
            if snap.error is not None and snap.source != "declared":
                return False  # the probe fails: its last data may be stale; start nothing on it
            dev = snap.device(gpu.device)
            if dev is None or dev.lost:
                return False
            if dev.processes is not None:
                gone = not (pending & {p.pid for p in dev.processes})
            else:
                gone = not any(psutil.pid_exists(pid) for pid in pending)
            # Degraded (declared) mode knows no free memory: the planner's budget must do.
            room = (need_mb <= 0 or dev.free_mb is None
                    or dev.free_mb - gpu.reserve_mb - self._claimed(name, snap) >= need_mb)
            if gone and room:
                self._claims[name] = need_mb  # granted: no await between check and claim
            return gone and room

        note = (f"judged by free memory alone for {', '.join(blind)} (pid list unavailable)"
                if blind else None)
        t0 = time.monotonic()
        if reclaimed(orch.poller.latest):
            return 0.0, note
        async with orch.poller.fast():
            snap = await orch.poller.wait_until(reclaimed, orch.reclaim_timeout_s)
            soft = [n for n in deps if n in orch.ledger.view().releasing
                    and not orch.ledger.view().releasing[n].must_exit
                    and orch.ledger.idle_kind(n) is not None]
            if snap is None and soft and not self._failures:
                # Eviction/pause did not give the memory back: stop them, and say so.
                for n in soft:
                    await self._fall_back(n)
                pending, blind, since = evidence()
                since = max(since, self._began)
                snap = await orch.poller.wait_until(reclaimed, orch.reclaim_timeout_s)
        if snap is None:
            dev = orch.device
            free = dev.free_mb if dev is not None else None
            listed = sorted(pending & {p.pid for p in (dev.processes or ())}) if dev else "?"
            probe = orch.poller.latest.error
            claimed = self._claimed(name, orch.poller.latest)
            raise OperationError(
                "reclaim_timeout",
                f"VRAM for {name} did not come back within {orch.reclaim_timeout_s:g}s: "
                f"need {need_mb} MB + {gpu.reserve_mb} MB reserve"
                + (f" + {claimed} MB claimed by starts beside it" if claimed else "")
                + f", {free} MB free; still listed: {listed}"
                + (f"; the probe fails: {probe}" if probe else ""),
                gpu_state=orch.gpu_state())
        orch.prune(snap, only=deps)  # another start's evidence is not ours to settle
        books = orch.ledger.view()
        orch.ledger.settle_soft([n for n in deps if n in books.releasing
                                 and (not books.releasing[n].pids_known
                                      or not books.releasing[n].must_exit)])
        return time.monotonic() - t0, note

    async def _fall_back(self, name: str) -> None:
        """Stop a service whose eviction/pause did not free its VRAM, once, however many
        starts of this plan wait on it."""
        running = self._fallbacks.get(name)
        if running is None:
            kind = self.orch.ledger.idle_kind(name)
            logger.warning(f"{name}: VRAM not back after {kind}; stopping it")
            running = self._fallbacks[name] = asyncio.ensure_future(
                self.stop(name, f"{kind} did not free its VRAM", False, False, "reclaim"))
        await asyncio.shield(running)


class _Skipped(Exception):
    """A step that did not begin because another step of the plan had failed."""


def _skip(record: StepRecord) -> None:
    record.status = "skipped"
    record.detail = "not run: another step of this plan failed"


def refusal_error(result: Refusal) -> OperationError:
    extra = {} if result.code != "insufficient_vram" else {
        "short_mb": result.short_mb,
        "blockers": [{"name": b.name, "mb": b.mb, "reason": b.reason} for b in result.blockers]}
    return OperationError(result.code, result.message, **extra)


