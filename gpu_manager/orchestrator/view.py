"""What the orchestrator knows of the GPU and its services: the inventory in force, the units,
the books (ledger) and the latest snapshot, and the planner's view built from them.

This is the half of the orchestrator that the pieces running a plan (executor, releases),
the follow-ups and a reload need; they take a `GpuView`, never the `Orchestrator` that runs
them, so no module of this package imports the one it serves.

Memory is counted once. A unit's pids' MB is the unit's; a client lease's process (the pid
its acquire gave, and that pid's children) is the lease's; what is left of the card's use
(less VRAM our stopped units may still be releasing) is foreign, except that foreign use up
to the claims of the active leases that gave no pid is taken as theirs: a client without a
pid on the GPU shows there as foreign, and counting it as both would refuse starts that fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterable

import psutil
from loguru import logger

from gpu_manager.aio import retrieve
from gpu_manager.bounds import Bounds
from gpu_manager.checkpoint import Capability
from gpu_manager.config import Inventory
from gpu_manager.orchestrator.cards import held_by_card, held_on, listed_pids, past_residual
from gpu_manager.orchestrator.costs import Costs
from gpu_manager.orchestrator.drain import Drainer, no_drain
from gpu_manager.orchestrator.ledger import ClientLease, Ledger, LedgerView
from gpu_manager.planner import (
    DeviceBudget,
    ObservedState,
    PlannerInventory,
    PreparePhase,
    Request,
    ServiceSpec,
    StartService,
)
from gpu_manager.probe import DeviceSnapshot, Poller, Snapshot
from gpu_manager.state_store import StateStore
from gpu_manager.units import EventBus, ServiceState, Unit
from gpu_manager.units.checkpoint_sleep import why_not

S = ServiceState
# Prewarmed services rank below everything: any start may preempt them.
PREWARM_PRIORITY = -(10**9)


def lease_tree(pid: int, create_time: float | None) -> list[int]:
    """A lease's process and its children, while it is the process the acquire named (a
    reused pid is not the client). Blocking: call it in a thread."""
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return []
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.Error:
        return []


class GpuView:
    def __init__(self, inventory: Inventory, units: dict[str, Unit], poller: Poller,
                 bus: EventBus, store: StateStore, *, reclaim_timeout_s: float,
                 bounds: Bounds) -> None:
        self.inventory = inventory  # written only by a reload (reconfig.apply_inventory)
        self.pinv = PlannerInventory.from_inventory(inventory)
        self.units = units  # written only by a reload
        self.poller = poller
        self.bus = bus
        self.store = store
        self.bounds = bounds
        self.reclaim_timeout_s = reclaim_timeout_s
        self.ledger = Ledger()
        self.current_phase: int | None = store.phase
        self.preemptions: dict[str, int] = {}
        # Started (or woken) by prewarm and not yet asked for by a phase or a start; written
        # only by the follow-ups (Followups.note).
        self.prewarmed: frozenset[str] = frozenset()
        # What each service's sleep holds in host RAM, measured (written by the release
        # steps only); the declared `sleep.host_ram_mb` until then.
        self.host_ram: dict[str, int] = {}
        # What the driver allows of cuda-checkpoint (None: not asked); written once by the
        # daemon's start.
        self.checkpoint_cap: Capability | None = None
        self._host_available: int | None = None  # MB; written by sample_host only
        self.sample_host()
        # What each release and return has cost (written by the plan runs only).
        self.costs = Costs(store.path.parent / "costs.json")
        # The front door, once it is up: what a release step drains first (set once).
        self.drainer: Drainer | None = None
        self._pid_reads: dict[tuple[str, int], asyncio.Future[list[int]]] = {}

    # -- where things are ---------------------------------------------------------------------
    @property
    def device(self) -> DeviceSnapshot | None:
        return self.poller.latest.device(self.inventory.gpu.device)

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

    def past_residual(self, name: str, snap: Snapshot) -> tuple[bool | None, int | None]:
        """Whether `name` holds more than its per-card residual on any of its cards (None:
        the GPU cannot tell), and what it holds in all."""
        unit = self.units.get(name)
        residual = unit.cfg.residual_mb if unit is not None else None
        pids = set(self.ledger.view().unit_pids.get(name, ()))
        return past_residual(held_by_card(snap, self.cards_of(name), pids), residual or 0)

    def holding_back(self, name: str,
                     request: Request) -> contextlib.AbstractAsyncContextManager[list[str]]:
        """Around a release step of `name`: the front door drains its requests first."""
        return no_drain() if self.drainer is None else self.drainer.hold_back(name, request)

    def no_sleep(self) -> dict[str, str]:
        """The services whose sleep this host cannot do, and why (the plan stops them and
        says so; status shows it)."""
        return {n: why for n, cfg in self.inventory.services.items()
                if (why := why_not(cfg, self.checkpoint_cap)) is not None}

    def host_ram_of(self, name: str) -> int:
        """What `name`'s sleep holds in host RAM: measured, else declared, else 0."""
        if name in self.host_ram:
            return self.host_ram[name]
        unit = self.units.get(name)
        sleep = unit.cfg.sleep if unit is not None else None
        return (sleep.host_ram_mb or 0) if sleep is not None else 0

    def host_free_mb(self) -> int | None:
        """Host RAM free for new sleeps (less `host.ram_reserve_mb`). The simulated host:
        its declared total less what the sleepers hold; the real one: /proc/meminfo's
        available (what sleepers hold is already in use there). None: no figure."""
        host = self.inventory.host
        if host.simulated_total_mb is not None:
            held = sum(self.host_ram_of(n) for n, u in list(self.units.items())
                       if u.state == S.SLEEPING)
            return host.simulated_total_mb - host.ram_reserve_mb - held
        return None if self._host_available is None else \
            self._host_available - host.ram_reserve_mb

    def sample_host(self) -> None:
        """Read the host's available RAM (/proc/meminfo: fast), once a second by the daemon:
        plans and the status read the sample, so two reads in a row agree."""
        try:
            self._host_available = psutil.virtual_memory().available // (1024 * 1024)
        except (OSError, psutil.Error):
            self._host_available = None

    def in_use(self) -> frozenset[str]:
        """The services the front door has requests in flight or waiting for."""
        return frozenset() if self.drainer is None else self.drainer.in_use()

    def drain_bound_s(self, name: str) -> float:
        return 0.0 if self.drainer is None else self.drainer.drain_bound_s(name)

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

    def live_prewarmed(self) -> frozenset[str]:
        """Prewarmed and still up: one that died or was stopped since is itself again."""
        return frozenset(n for n in self.prewarmed
                         if n in self.units and self.units[n].holds_gpu)

    # -- reading pids -------------------------------------------------------------------------
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

    async def _lease_pids(self, lease: ClientLease) -> tuple[int, ...]:
        if lease.pid is None:
            return ()
        try:
            async with asyncio.timeout(self.bounds.pids_s):
                found = await asyncio.to_thread(lease_tree, lease.pid, lease.pid_created)
        except TimeoutError:
            return tuple(self.ledger.view().unit_pids.get(lease.name, ()))
        return tuple(sorted(found))

    async def refresh_pids(self, prune: bool = True) -> None:
        """Re-read every unit's pids (and each client lease's process tree). `prune`: also
        forget releases the GPU has completed; off while a plan runs, whose starts settle
        their own evidence (one start must not drop the release another start still waits
        on)."""
        units = [(n, u) for n, u in list(self.units.items()) if u.holds_gpu]
        leases = [x for x in self.ledger.view().active_leases if x.pid is not None]
        results, lease_pids = await asyncio.gather(
            asyncio.gather(*(self.read_pids(n) for n, _ in units)),
            asyncio.gather(*(self._lease_pids(x) for x in leases)))
        fresh = {n: tuple(sorted(p)) for (n, _), (p, err) in zip(units, results, strict=True)
                 if err is None}
        errors = {n: err for (n, _), (_, err) in zip(units, results, strict=True)
                  if err is not None}
        ours = {pid for pids in fresh.values() for pid in pids}
        # a unit's pid is the unit's, whatever a client says
        fresh.update({x.name: tuple(p for p in pids if p not in ours)
                      for x, pids in zip(leases, lease_pids, strict=True)})
        self.ledger.set_pids(fresh, errors)
        if prune:
            self.prune(self.poller.latest)
        snap = self.poller.latest
        for name, unit in list(self.units.items()):
            if unit.state != S.SLEEPING or unit.cfg.residual_mb is None \
                    or name in self.ledger.view().releasing or snap.taken_at <= unit.since_mono:
                # a sleep still being confirmed, or a reading from before it fell asleep
                continue
            over, mb = self.past_residual(name, snap)
            if over:
                # Ollama and ComfyUI load the model again for the next request on their own
                await unit.woke(f"holds {mb} MB, more than its {unit.cfg.residual_mb} MB "
                                "residual on a card")

    def prune(self, snap: Snapshot, only: list[str] | None = None) -> None:
        self.ledger.prune_releasing(listed_pids(snap, self.cards), psutil.pid_exists,
                                    self.reclaim_timeout_s, only)

    # -- the planner's view -------------------------------------------------------------------
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
        running.update({x.name: self.measured(x.name) if x.pid is not None else None
                        for x in books.active_leases})
        unready = frozenset(n for n in running if n in self.units
                            and self.units[n].state == S.FAILED)
        if gpu.several:
            return self._observed_cards(books, running, sleeping, unready)
        total = dev.total_mb if dev is not None and dev.total_mb is not None else gpu.total_mb
        foreign = 0
        if dev is not None and dev.used_mb is not None:
            managed = sum(mb or 0 for mb in (*running.values(), *sleeping.values()))
            # A sleeper's memory is still its pids' (measured above), not also releasing.
            releasing = sum(r.mb for r in books.releasing.values() if r.must_exit)
            foreign = max(0, dev.used_mb - managed - releasing
                          - _pidless_claims(books.active_leases, None))
        return ObservedState(total or 0, running, gpu.reserve_mb, foreign, self.current_phase,
                             sleeping, unready, in_use=self.in_use(),
                             host_free_mb=self.host_free_mb())

    def _per_card(self, books: LedgerView, names: Iterable[str]) -> dict[int, DeviceBudget]:
        """Each managed card's budget: its total (NVML's, else the declared one), reserve,
        and foreign use: what the card has in use less what our units' and leases' pids hold
        there, what our stopped units may still be releasing there, and the pidless leases'
        claims there."""
        snap = self.poller.latest
        names = list(names)
        out: dict[int, DeviceBudget] = {}
        for card in self.inventory.gpu.managed:
            dev = snap.device(card.index)
            total = dev.total_mb if dev is not None and dev.total_mb is not None \
                else card.total_mb
            foreign = 0
            if dev is not None and dev.used_mb is not None:
                ours = sum(self.measured(n, snap, card.index) or 0 for n in names)
                releasing = sum(r.mb // len(r.devices) for r in books.releasing.values()
                                if r.must_exit and card.index in r.devices)
                foreign = max(0, dev.used_mb - ours - releasing
                              - _pidless_claims(books.active_leases, card.index))
            out[card.index] = DeviceBudget(total or 0, card.reserve_mb, foreign)
        return out

    def _observed_cards(self, books: LedgerView, running: dict[str, int | None],
                        sleeping: dict[str, int | None],
                        unready: frozenset[str]) -> ObservedState:
        """The planner's view with several cards: each card's budget, every service on its
        cards (recorded ones, else the primary card: where a one-GPU daemon ran it, or an
        adopted record without cards), a multi-card service's MB as measured on each."""
        gpu = self.inventory.gpu
        cards = self._per_card(books, [*running, *sleeping])
        placement = {n: self.cards_of(n) for n in self.units if n in running or n in sleeping}
        placement.update({n: lease.devices for n, lease in books.leases.items()
                          if lease.active and lease.devices})
        snap = self.poller.latest
        card_mb = {n: {d: self.measured(n, snap, d) for d in on}
                   for n, on in placement.items() if len(on) > 1 and n in self.units}
        return ObservedState(
            sum(c.total_mb for c in cards.values()), running,
            sum(c.reserve_mb for c in cards.values()),
            sum(c.foreign_mb for c in cards.values()), self.current_phase, sleeping, unready,
            devices=cards, placement=placement, strategy=gpu.placement, card_mb=card_mb,
            in_use=self.in_use(), host_free_mb=self.host_free_mb())

    def planner_inventory(self) -> PlannerInventory:
        """The inventory as the planner must see it now: client leases as unstoppable
        services, prewarmed ones below every priority, and each unit's sleep ability as its
        running instance has it (a reload that adds or drops `sleep:` applies at its next
        start)."""
        leases = self.ledger.view().leases
        prewarmed = self.live_prewarmed()
        live = {n: u.cfg.residual_mb for n, u in list(self.units.items())
                if n in self.pinv.services and self.pinv.services[n].residual_mb
                != u.cfg.residual_mb}
        measured = {n: mb for n, mb in self.host_ram.items()
                    if n in self.pinv.services and self.pinv.services[n].host_ram_mb != mb}
        costs = {n: (self.costs.p50(n, "start"), self.costs.p50(n, "wake"))
                 for n in self.pinv.services}
        costs = {n: c for n, c in costs.items() if c != (None, None)}
        no_sleep = self.no_sleep()
        if not leases and not prewarmed and not live and not measured and not costs \
                and not no_sleep:
            return self.pinv
        services = dict(self.pinv.services)
        for name, why in no_sleep.items():
            live[name] = None  # cannot sleep here: planned as a stop that says why
            services[name] = dataclasses.replace(services[name], no_sleep=why)
        for name, (start_s, wake_s) in costs.items():
            services[name] = dataclasses.replace(services[name], start_s=start_s,
                                                 wake_s=wake_s)
        for name, residual in live.items():
            services[name] = dataclasses.replace(services[name], residual_mb=residual)
        for name, mb in measured.items():
            services[name] = dataclasses.replace(services[name], host_ram_mb=mb)
        for name in prewarmed & set(services):
            services[name] = dataclasses.replace(services[name], priority=PREWARM_PRIORITY,
                                                 preemptible=True)
        for name, lease in leases.items():
            services[name] = ServiceSpec(
                name, lease.vram_mb, lease.priority, preemptible=False, stoppable=False,
                devices=None if lease.device is None else (lease.device,))
        return PlannerInventory(services, self.pinv.phases)


def _pidless_claims(leases: list[ClientLease], card: int | None) -> int:
    """What the active leases that gave no pid claim (on `card`; None: the one card)."""
    return sum(x.vram_mb for x in leases if x.pid is None
               and (card is None or card in x.devices))
