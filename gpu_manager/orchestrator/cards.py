"""Several GPUs as the orchestrator reads them from a snapshot: what pids hold on which card,
foreign use per card, how a card is named to the service placed on it, and the one rule for
a sleeper's residual (per card)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gpu_manager.planner import ObservedState
from gpu_manager.probe import Snapshot


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


def held_by_card(snap: Snapshot, cards: Iterable[int],
                 pids: set[int]) -> dict[int, int] | None:
    """What `pids` hold on each of `cards` (0 where none is listed: a process that let go of
    everything leaves the list); None when the GPU cannot tell (a list unknown, or memory
    not attributable to processes)."""
    out: dict[int, int] = {}
    for index in cards:
        found = held_on(snap, (index,), pids)
        if found is None or any(mb is None for mb in found):
            return None
        out[index] = sum(mb for mb in found if mb is not None)
    return out


def past_residual(held: Mapping[int, int] | None,
                  residual_mb: int) -> tuple[bool | None, int | None]:
    """A sleeper's `residual_mb` is what it may keep on EACH of its cards: whether `held`
    (per card) goes past it on any card (None: unknown), and the MB held in all. The sleep's
    confirmation, the woke check and the planner's per-card view all count it so; a sum over
    two cards compared with one card's residual stopped sleepers that had slept."""
    if held is None:
        return None, None
    return any(mb > residual_mb for mb in held.values()), sum(held.values())


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


def visible_ids(snap: Snapshot, cards: Iterable[int]) -> tuple[str, ...]:
    """How the service is told its cards: UUIDs where the probe knows them (they survive a
    change of enumeration order), else indices."""
    out = []
    for index in cards:
        dev = snap.device(index)
        out.append(dev.uuid if dev is not None and dev.uuid else str(index))
    return tuple(out)
