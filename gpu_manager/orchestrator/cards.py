"""Several GPUs as the orchestrator sees them: each managed card's budget and foreign use,
the pids on any of them, and how a card is named to the service placed on it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from gpu_manager.planner import DeviceBudget, ObservedState
from gpu_manager.probe import Snapshot

if TYPE_CHECKING:
    from gpu_manager.orchestrator.core import Orchestrator
    from gpu_manager.orchestrator.ledger import LedgerView


def held_on(snap: Snapshot, cards: Iterable[int], pids: set[int]) -> list[int | None] | None:
    """The MB the GPU lists for `pids` on `cards` (None entries: not attributable); None
    when a card's process list is unknown."""
    out: list[int | None] = []
    for index in cards:
        dev = snap.device(index)
        if dev is None or dev.processes is None:
            return None
        out += [p.used_mb for p in dev.processes if p.pid in pids]
    return out


def foreign_on(observed: ObservedState, card: int) -> int:
    """Foreign MB on `card`: its own count with several cards, the one count with one."""
    budget = observed.devices.get(card)
    return budget.foreign_mb if budget is not None else observed.foreign_mb


def listed_pids(snap: Snapshot, cards: Iterable[int]) -> set[int] | None:
    """The pids the GPU lists on any of `cards`; None when a card's list is unknown."""
    out: set[int] = set()
    for index in cards:
        dev = snap.device(index)
        if dev is None or dev.processes is None:
            return None
        out |= {p.pid for p in dev.processes}
    return out


def per_card(orch: Orchestrator, books: LedgerView,
             names: Iterable[str]) -> dict[int, DeviceBudget]:
    """Each managed card's budget: its total (NVML's, else the declared one), reserve, and
    foreign use: what the card has in use less what our units' pids hold there and what
    our stopped units may still be releasing there."""
    snap = orch.poller.latest
    names = list(names)
    out: dict[int, DeviceBudget] = {}
    for card in orch.inventory.gpu.managed:
        dev = snap.device(card.index)
        total = dev.total_mb if dev is not None and dev.total_mb is not None else card.total_mb
        foreign = 0
        if dev is not None and dev.used_mb is not None:
            ours = sum(orch.measured(n, snap, card.index) or 0 for n in names)
            releasing = sum(r.mb // len(r.devices) for r in books.releasing.values()
                            if r.must_exit and card.index in r.devices)
            foreign = max(0, dev.used_mb - ours - releasing)
        out[card.index] = DeviceBudget(total or 0, card.reserve_mb, foreign)
    return out


def observed_cards(orch: Orchestrator, books: LedgerView, running: dict[str, int | None],
                   sleeping: dict[str, int | None], unready: frozenset[str]) -> ObservedState:
    """The planner's view with several cards: each card's budget, every service on its
    cards (recorded ones, else the primary card: where a one-GPU daemon ran it, or an
    adopted record without cards), a multi-card service's MB as measured on each."""
    gpu = orch.inventory.gpu
    cards = per_card(orch, books, [*running, *sleeping])
    placement = {n: orch.cards_of(n) for n in orch.units if n in running or n in sleeping}
    placement.update({n: lease.devices for n, lease in books.leases.items()
                      if lease.active and lease.devices})
    snap = orch.poller.latest
    card_mb = {n: {d: orch.measured(n, snap, d) for d in on}
               for n, on in placement.items() if len(on) > 1 and n in orch.units}
    return ObservedState(
        sum(c.total_mb for c in cards.values()), running,
        sum(c.reserve_mb for c in cards.values()),
        sum(c.foreign_mb for c in cards.values()), orch.current_phase, sleeping, unready,
        devices=cards, placement=placement, strategy=gpu.placement, card_mb=card_mb)


def visible_ids(snap: Snapshot, cards: Iterable[int]) -> tuple[str, ...]:
    """How the service is told its cards: UUIDs where the probe knows them (they survive a
    change of enumeration order), else indices."""
    out = []
    for index in cards:
        dev = snap.device(index)
        out.append(dev.uuid if dev is not None and dev.uuid else str(index))
    return tuple(out)
