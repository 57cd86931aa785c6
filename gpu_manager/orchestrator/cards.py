"""Several GPUs as the orchestrator sees them: each managed card's budget and foreign use,
the pids on any of them, and how a card is named to the service placed on it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from gpu_manager.planner import DeviceBudget
from gpu_manager.probe import Snapshot

if TYPE_CHECKING:
    from gpu_manager.orchestrator.core import Orchestrator
    from gpu_manager.orchestrator.ledger import LedgerView


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
    primary = orch.inventory.gpu.device
    out: dict[int, DeviceBudget] = {}
    for card in orch.inventory.gpu.managed:
        dev = snap.device(card.index)
        total = dev.total_mb if dev is not None and dev.total_mb is not None else card.total_mb
        foreign = 0
        if dev is not None and dev.used_mb is not None:
            ours = sum(orch.measured(n, snap, card.index) or 0 for n in names)
            releasing = sum(r.mb // max(1, len(r.devices)) for r in books.releasing.values()
                            if r.must_exit and card.index in (r.devices or (primary,)))
            foreign = max(0, dev.used_mb - ours - releasing)
        out[card.index] = DeviceBudget(total or 0, card.reserve_mb, foreign)
    return out


def visible_ids(snap: Snapshot, cards: Iterable[int]) -> tuple[str, ...]:
    """How the service is told its cards: UUIDs where the probe knows them (they survive a
    change of enumeration order), else indices."""
    out = []
    for index in cards:
        dev = snap.device(index)
        out.append(dev.uuid if dev is not None and dev.uuid else str(index))
    return tuple(out)
