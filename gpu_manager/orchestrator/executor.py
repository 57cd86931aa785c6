"""Run one plan: release (stop or sleep) -> wait for reclaim by evidence -> start or wake ->
wait ready, each bounded (orchestrator/deadlines.py), as the graph the planner drew. The
caller (`Orchestrator.execute`) adds an overall deadline as a backstop and always drops the
GPU lock, whatever happened.
"""

from __future__ import annotations

import asyncio
import time

import psutil
from loguru import logger

from gpu_manager.lock.keeper import Claim
from gpu_manager.orchestrator.cards import listed_pids, visible_ids
from gpu_manager.orchestrator.deadlines import lock_call, wanted_by
from gpu_manager.orchestrator.operations import Operation, OperationError, StepRecord
from gpu_manager.orchestrator.releases import Releases
from gpu_manager.orchestrator.view import GpuView
from gpu_manager.planner import RELEASES, Plan, PreparePhase, SleepService, Step
from gpu_manager.probe import Snapshot
from gpu_manager.units import Event, ServiceState

S = ServiceState


class PlanRun(Releases):
    """One plan, run as the graph the planner drew: every step is a task that waits for the
    steps it names in `after` (a start for the stops whose VRAM it needs), so independent
    stops run side by side, the starts of a phase run side by side, and a start that fits
    beside what still runs begins at once. After a failure nothing new begins; what already
    runs finishes (each under its own deadline), and the first failure is raised.

    A run is made for one plan and dropped after it: its claims, failures and fall-backs
    can never leak into the next plan. `claim` is the operation's hold on the GPU lock,
    checked (fencing) before every start."""

    def __init__(self, view: GpuView, op: Operation, plan: Plan, claim: Claim, *,
                 serial: bool = False) -> None:
        self.view = view
        self.op = op
        self.plan = plan
        self.claim = claim
        self.serial = serial  # settings.plan_mode == "serial": each step after all before it
        # Starts of this plan that passed their room check, and the MB each was granted: for
        # the rest of the plan a start beside them counts what they have not yet shown on
        # the GPU (the planner counts their declared size too). Set in the same synchronous
        # step as the room check that granted it, so no two starts can both see the same
        # free memory, whatever the awaits after it (a Redis fencing check yields).
        self._claims: dict[str, dict[int, int]] = {}  # name -> {card: MB}
        self._failures: list[BaseException] = []
        self._began = time.monotonic()
        self._fallbacks: dict[str, asyncio.Future[str | None]] = {}
        self.fell_back: dict[str, str] = {}

    def done(self) -> dict[str, str]:
        """What ran to its end: service -> action."""
        return {s.service: s.action for s in self.op.steps if s.status == "done"}

    async def run(self) -> None:
        view, op = self.view, self.op
        steps = self.plan.steps
        finished = [asyncio.Event() for _ in steps]
        failures = self._failures

        async def one(i: int) -> None:
            step, record = steps[i], op.steps[i]
            waits = range(i) if self.serial else step.after
            try:
                for d in waits:
                    await finished[d].wait()
                if failures or any(op.steps[d].status != "done" for d in waits):
                    _skip(record)
                    return
                await self._step(step, record, [steps[d].service for d in step.after])
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
        if not failures:
            await self._join_starts()
        if failures:
            first = failures[0]
            if isinstance(first, OperationError) and "gpu_state" in first.extra:
                # as it is now that every branch has ended, not as it was at the failure
                first.extra["gpu_state"] = view.gpu_state()
            raise first
        if isinstance(op.request, PreparePhase):
            view.set_phase(op.request.phase)
        if steps:
            # One fresh poll, so /gpu/status read right after this answer shows the result.
            await view.poller.next_snapshot(timeout=2)  # (the pids: after the lock drop)

    async def _join_starts(self) -> None:
        """A service the request wants that the plan found already starting (a prewarm that
        gave way, a restart in flight) is waited for: the answer means ready."""
        view, op = self.view, self.op
        wanted = wanted_by(view, op.request)
        stepped = {s.service for s in op.steps}
        for name in wanted:
            unit = view.units.get(name)
            if unit is None or name in stepped or unit.state not in (S.STARTING, S.WAKING):
                continue
            result = await unit.ensure_ready()  # joins the start in flight
            if not result.ok:
                raise OperationError("start_failed", f"{name} did not become ready: "
                                     f"{result.reason}", gpu_state=view.gpu_state())

    async def _step(self, step: Step, record: StepRecord, deps: list[str]) -> None:
        view, op = self.view, self.op
        record.status, record.started_at = "running", time.time()
        view.bus.publish(Event("step", step.service, {"op": op.id, **vars(record)}))
        t0 = time.monotonic()
        try:
            if self.claim.is_lost():  # the keeper saw it go: settled before this step
                await lock_call("check", self.claim.check(), view.bounds.lock_io_s)
            if step.action in RELEASES:
                # requests in flight at the front door finish first (up to its drain_s)
                async with view.holding_back(step.service, op.request) as notes:
                    if step.action == "stop":
                        detail = await self.stop(step.service, step.reason, step.preemption)
                    else:
                        detail = await self.sleep(step.service, step.reason, step.preemption,
                                                  view.owner(op.request),
                                                  isinstance(op.request, SleepService),
                                                  deep=step.how == "checkpoint")
                record.detail = "; ".join([*notes, *([detail] if detail else [])]) or None
            else:
                record.reclaim_wait_s, record.detail = await self.start(
                    step.service, step.mb, deps, step.devices)
        except BaseException as exc:
            record.status = "failed"
            record.detail = str(exc) or type(exc).__name__
            raise
        finally:
            record.duration_s = time.monotonic() - t0
        record.status = "done"
        self._learn("checkpoint" if step.how == "checkpoint" else step.action, step.service,
                    record)
        logger.bind(service=step.service, op=op.id, action=step.action,
                    reason=step.reason, duration_s=record.duration_s,
                    preemption=step.preemption).info(
            f"{step.action} {step.service} done in {record.duration_s:.3f}s "
            f"({step.reason})" + (f"; {record.detail}" if record.detail else ""))
        view.bus.publish(Event("step", step.service, {"op": op.id, **vars(record)}))

    def _learn(self, action: str, name: str, record: StepRecord) -> None:
        """What the step cost, for the planner's next choice of victims (costs.py): a start
        or wake without its wait for VRAM; a sleep only when it slept (not a fallback)."""
        costs, took = self.view.costs, record.duration_s or 0.0
        waited = record.reclaim_wait_s or 0.0
        unit = self.view.units.get(name)
        if unit is not None and unit.cfg.sleep is not None \
                and unit.cfg.sleep.api == "cuda-checkpoint":  # its own kinds: other figures
            action = {"sleep": "checkpoint", "wake": "restore"}.get(action, action)
        if action in ("start", "wake", "restore"):
            costs.record(name, action, max(0.0, took - waited))
            if record.reclaim_wait_s is not None:
                costs.record(name, "reclaim", waited)
        elif action in ("sleep", "checkpoint") and name not in self.fell_back:
            costs.record(name, action, took)
        elif action == "stop":
            costs.record(name, "stop", took)

    async def start(self, name: str, need_mb: int, deps: list[str] | None = None,
                    devices: tuple[int, ...] = ()) -> tuple[float, str | None]:
        """Start (or wake) `name` on `devices` (the plan's cards; a single-card plan names
        none: the one card) once `need_mb` (over all its cards) is free there."""
        view = self.view
        cards = devices or view.cards_of(name)
        # fencing: nobody took the lock since we did
        await lock_call("check", self.claim.check(), view.bounds.lock_io_s)
        waited, note = await self.await_reclaim(name, need_mb, deps or [], cards)  # claims
        launched = False
        try:
            await lock_call("check", self.claim.check(), view.bounds.lock_io_s)
            if self._failures:  # a sibling failed while this one waited: begin nothing new
                raise _Skipped
            result = await self._launch(name, waited, note, cards)
            launched = True
            return result
        finally:
            if not launched:
                self._claims.pop(name, None)

    async def _launch(self, name: str, waited: float, note: str | None,
                      cards: tuple[int, ...]) -> tuple[float, str | None]:
        view = self.view
        several = view.inventory.gpu.several
        if view.ledger.lease(name) is not None:  # a client lease: the VRAM is now theirs
            view.ledger.activate(name, cards if several else ())
            return waited, note
        unit = view.units[name]
        waking = unit.state == S.SLEEPING
        if not waking:  # where it runs, told to it (a wake stays put); one GPU: nothing
            unit.place(*((cards, visible_ids(view.poller.latest, cards)) if several
                         else ((), ())))
        result = await unit.ensure_ready()  # wakes it when it sleeps
        if not result.ok and waking:
            # It did not wake: stop what is left of it and start it cold (the VRAM is
            # already reserved for it), and say so.
            logger.warning(f"{name}: wake failed ({result.reason}); starting it cold")
            note = "; ".join(x for x in (note, f"wake failed ({result.reason}); started "
                                         "cold instead") if x)
            await self.stop(name, f"wake failed: {result.reason}", False)
            await self.await_reclaim(name, unit.cfg.vram_mb * len(cards), [name],
                                     cards)  # its memory back first
            await lock_call("check", self.claim.check(), view.bounds.lock_io_s)  # fencing
            result = await unit.ensure_ready()
        if not result.ok:
            # The unit has already stopped what it launched; say where that leaves the GPU.
            raise OperationError("start_failed", f"{name} did not become ready: {result.reason}",
                                 gpu_state=view.gpu_state())
        return waited, note

    def _claimed(self, but: str, snap: Snapshot, card: int) -> int:
        """MB that starts granted beside this one on `card` have not yet shown there (by
        what the snapshot attributes to their pids; their pids are refreshed while anyone
        waits)."""
        return sum(max(0, cards[card] - (self.view.measured(n, snap, card) or 0))
                   for n, cards in self._claims.items() if n != but and card in cards)

    async def _refresh_claimants(self) -> None:
        """While the plan runs, keep the pids of the starts granted so far current, so their
        allocations count once (as used memory), not twice (also as claim). A failed
        refresh is logged and tried again: the claims then just stay whole (conservative)."""
        while True:
            if self._claims:
                try:
                    await self.view.refresh_pids(prune=False)
                except Exception as exc:
                    logger.opt(exception=exc).error(f"pid refresh during a plan: {exc}")
            await asyncio.sleep(0.2)

    async def await_reclaim(self, name: str, need_mb: int, deps: list[str],
                            cards: tuple[int, ...]) -> tuple[float, str | None]:
        """Wait until the stops `deps` have given their VRAM back (their pids off the GPU's
        list) and free memory covers `need_mb` beside the claims of starts still launching;
        releases this start does not depend on are not waited for."""
        view = self.view
        gpu = view.inventory.gpu
        each = -(-need_mb // len(cards))  # on each of its cards

        def evidence() -> tuple[frozenset[int], list[str], float]:
            books = view.ledger.view()
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
            devs = [snap.device(c) for c in cards]
            if any(dev is None or dev.lost for dev in devs):
                return False
            listed = listed_pids(snap, view.cards)
            if listed is not None:
                gone = not (pending & listed)
            else:
                gone = not any(psutil.pid_exists(pid) for pid in pending)
            # Degraded (declared) mode knows no free memory: the planner's budget must do.
            room = each <= 0 or all(
                dev.free_mb is None or dev.free_mb - reserve(c) - self._claimed(name, snap, c)
                >= each for c, dev in zip(cards, devs, strict=True) if dev is not None)
            if gone and room:
                # granted: no await between check and claim. A wake's need is on top of what
                # it holds asleep, which `_claimed` subtracts as shown: claim both.
                self._claims[name] = {c: each + (view.measured(name, snap, c) or 0)
                                      for c in cards}
            return gone and room

        def reserve(card: int) -> int:
            found = gpu.gpu(card)
            return found.reserve_mb if found is not None else gpu.reserve_mb

        note = (f"judged by free memory alone for {', '.join(blind)} (pid list unavailable)"
                if blind else None)
        t0 = time.monotonic()
        if reclaimed(view.poller.latest):
            return 0.0, note
        async with view.poller.fast():
            snap = await view.poller.wait_until(reclaimed, view.reclaim_timeout_s)
            soft = [n for n in deps if n in view.ledger.view().releasing
                    and not view.ledger.view().releasing[n].must_exit
                    and n in view.units and view.units[n].state == S.SLEEPING]
            if snap is None and soft and not self._failures:
                # Asleep, but the memory did not come back: stop them, and say so.
                for n in soft:
                    await self._fall_back(n)
                pending, blind, since = evidence()
                since = max(since, self._began)
                snap = await view.poller.wait_until(reclaimed, view.reclaim_timeout_s)
        if snap is None:
            latest = view.poller.latest
            listed = listed_pids(latest, view.cards)
            still = sorted(pending & listed) if listed is not None else "?"
            probe = latest.error
            raise OperationError(
                "reclaim_timeout",
                f"VRAM for {name} did not come back within {view.reclaim_timeout_s:g}s: "
                + "; ".join(self._room(name, latest, c, each, reserve(c)) for c in cards)
                + f"; still listed: {still}"
                + (f"; the probe fails: {probe}" if probe else ""),
                gpu_state=view.gpu_state())
        view.prune(snap, only=deps)  # another start's evidence is not ours to settle
        books = view.ledger.view()
        view.ledger.settle_soft([n for n in deps if n in books.releasing
                                 and (not books.releasing[n].pids_known
                                      or not books.releasing[n].must_exit)])
        return time.monotonic() - t0, note

    def _room(self, name: str, snap: Snapshot, card: int, need: int, reserve: int) -> str:
        dev = snap.device(card)
        free = dev.free_mb if dev is not None else None
        claimed = self._claimed(name, snap, card)
        where = f" on GPU {card}" if self.view.inventory.gpu.several else ""
        return (f"need {need} MB + {reserve} MB reserve"
                + (f" + {claimed} MB claimed by starts beside it" if claimed else "")
                + f", {free} MB free{where}")

    async def _fall_back(self, name: str) -> None:
        """Stop a service whose sleep did not free its VRAM, once, however many starts of
        this plan wait on it."""
        running = self._fallbacks.get(name)
        if running is None:
            logger.warning(f"{name}: VRAM not back after its sleep; stopping it")
            self.fell_back[name] = "asleep, but its VRAM did not come back; stopped instead"
            running = self._fallbacks[name] = asyncio.ensure_future(
                self.stop(name, "its sleep did not free its VRAM", False))
        await asyncio.shield(running)


class _Skipped(Exception):
    """A step that did not begin because another step of the plan had failed."""


def _skip(record: StepRecord) -> None:
    record.status = "skipped"
    record.detail = "not run: another step of this plan failed"
