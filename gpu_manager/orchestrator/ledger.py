"""The VRAM books: which units run with which pids, what is still releasing, and the client
leases. The ledger is their only writer. (Whether a unit sleeps is the unit's state.)

Before it, the orchestrator, the lease manager, the reloader and the API all assigned into
these dicts, and two of the resulting bugs were: a lease marked active with `expires = 0.0`
until a later line set it (the expiry loop could release a lease that `acquire` then reported
as granted), and a removed service left in `idle` that made every later pid refresh fail.
Now every change is one method call that leaves the books consistent, leases are immutable
records replaced whole (activation sets `active`, `acquired_at` and `expires` in one step),
and readers (API, metrics, the planner's view) get a `LedgerView`: an immutable snapshot.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

LOST_KEPT = 1000  # lost leases remembered for their clients' next renewal


@dataclass(frozen=True, slots=True)
class Releasing:
    """VRAM of a stopped unit that the GPU may not have handed back yet."""

    pids: frozenset[int]
    mb: int
    since: float  # time.monotonic()
    # Asleep: the process lives on, so its pids' VRAM and free memory are the evidence.
    must_exit: bool = True
    # The pid list could not be read at the stop: only free memory is evidence, and the
    # step says so.
    pids_known: bool = True
    devices: tuple[int, ...] = ()  # the cards it is released from


@dataclass(frozen=True, slots=True)
class ClientLease:
    """VRAM a client holds for a while: counted by the planner, never stopped by it."""

    session_id: str
    requester: str
    priority: int
    client_priority: int
    vram_mb: int
    ttl_s: float
    legacy: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)
    active: bool = False
    acquired_at: float | None = None  # wall clock, once active
    expires: float = float("inf")  # time.monotonic(); only meaningful once active
    # Several GPUs: the card asked for (None: any that fits), and the card(s) it holds
    # once active.
    device: int | None = None
    devices: tuple[int, ...] = ()
    # The client's process (as the host sees it) and its create time: its memory, and its
    # children's, is the lease's, not foreign. None: not given, or not found on this host.
    pid: int | None = None
    pid_created: float | None = None
    # The highest priority its grant may preempt (None: any); see PreparePhase.max_preempt.
    max_preempt: int | None = None
    # Its grant reached a client (an answer to a caller still connected, or a renewal): a
    # grant no caller received expires within seconds instead of its whole TTL.
    claimed: bool = False

    @property
    def name(self) -> str:
        return lease_name(self.session_id)


@dataclass(frozen=True, slots=True)
class LostLease:
    """A lease taken from its client (the GPU lock went to someone else), kept so that the
    client's next renewal hears why instead of a bare "no such session"."""

    lease: ClientLease
    reason: str
    at: float  # wall clock


def lease_name(session_id: str) -> str:
    return f"lease:{session_id}"


@dataclass(frozen=True, slots=True)
class LedgerView:
    """An immutable copy of the books, for the API, metrics and the planner's view."""

    unit_pids: Mapping[str, tuple[int, ...]]
    pid_errors: Mapping[str, str]
    releasing: Mapping[str, Releasing]
    leases: Mapping[str, ClientLease]
    last_stop_at: float

    @property
    def active_leases(self) -> list[ClientLease]:
        return [x for x in self.leases.values() if x.active]

    def owner_of(self) -> dict[int, str]:
        return {pid: name for name, pids in self.unit_pids.items() for pid in pids}


class Ledger:
    def __init__(self) -> None:
        self._pids: dict[str, tuple[int, ...]] = {}
        self._pid_errors: dict[str, str] = {}
        self._releasing: dict[str, Releasing] = {}
        self._leases: dict[str, ClientLease] = {}
        self._lost: OrderedDict[str, LostLease] = OrderedDict()
        self._last_stop_at = 0.0
        self._view: LedgerView | None = None

    # -- reads --------------------------------------------------------------------------------
    def view(self) -> LedgerView:
        if self._view is None:  # rebuilt after a write, shared by readers until the next
            self._view = LedgerView(
                MappingProxyType(dict(self._pids)), MappingProxyType(dict(self._pid_errors)),
                MappingProxyType(dict(self._releasing)), MappingProxyType(dict(self._leases)),
                self._last_stop_at)
        return self._view

    def _changed(self) -> None:
        self._view = None

    def lease(self, name: str) -> ClientLease | None:
        return self._leases.get(name)

    def lost(self, name: str) -> LostLease | None:
        return self._lost.get(name)

    # -- units --------------------------------------------------------------------------------
    def set_pids(self, fresh: Mapping[str, tuple[int, ...]], errors: Mapping[str, str]) -> None:
        """A pid refresh: `fresh` for the units read, `errors` for those that could not be
        read (their last known pids are kept, marked unreliable); everyone else holds none."""
        pids = {n: p for n, p in self._pids.items() if n in errors}
        pids.update(fresh)
        self._pids, self._pid_errors = pids, dict(errors)
        self._changed()

    def released(self, name: str, rel: Releasing) -> None:
        """`name` was stopped (or put to sleep): its VRAM is on its way back."""
        self._releasing[name] = rel
        self._last_stop_at = time.monotonic()
        if rel.must_exit:
            self._pids.pop(name, None)
            self._pid_errors.pop(name, None)
        self._changed()

    def forget(self, name: str) -> None:
        """A service left the inventory (after its stop): no books of it remain, except VRAM
        still on its way back, which is pruned by evidence like any other."""
        for books in (self._pids, self._pid_errors):
            books.pop(name, None)
        self._changed()

    def prune_releasing(self, listed: set[int] | None, alive: Callable[[int], bool],
                        timeout_s: float, only: Iterable[str] | None = None) -> None:
        """Forget releases the GPU has completed. `listed`: pids on the GPU's process list
        (None when unknown: then only dead pids count as released). `only`: just these."""
        now = time.monotonic()
        names = set(only) if only is not None else None
        for name, rel in list(self._releasing.items()):
            if names is not None and name not in names:
                continue
            gone = not (rel.pids & (listed or set())) and (
                listed is not None or not any(alive(pid) for pid in rel.pids))
            if (gone and rel.pids_known) or now - rel.since > timeout_s:
                # after the timeout we stop waiting on it; what is left shows as foreign
                del self._releasing[name]
                self._changed()

    def settle_soft(self, names: Iterable[str]) -> None:
        """Sleeps whose VRAM was confirmed back: nothing left to wait for."""
        for name in names:
            if self._releasing.pop(name, None) is not None:
                self._changed()

    # -- client leases ------------------------------------------------------------------------
    def add_pending(self, lease: ClientLease) -> bool:
        """A lease being tried: the planner sees its size and priority, no one counts it yet.
        False (and nothing changes) when that session already has a lease or a try."""
        if lease.name in self._leases:
            return False
        self._lost.pop(lease.name, None)
        self._leases[lease.name] = dataclasses.replace(lease, active=False)
        self._changed()
        return True

    def activate(self, name: str, devices: tuple[int, ...] = ()) -> ClientLease | None:
        """The VRAM is the client's now (on `devices`): active, acquired and expiring, all
        in one step."""
        lease = self._leases.get(name)
        if lease is None:
            return None
        lease = dataclasses.replace(lease, active=True, acquired_at=time.time(),
                                    expires=time.monotonic() + lease.ttl_s, devices=devices)
        self._leases[name] = lease
        self._changed()
        return lease

    def renew(self, name: str) -> ClientLease | None:
        """Its full TTL again, from now; a renewal is also proof a client has it."""
        lease = self._leases.get(name)
        if lease is None or not lease.active:
            return None
        lease = dataclasses.replace(lease, expires=time.monotonic() + lease.ttl_s,
                                    claimed=True)
        self._leases[name] = lease
        self._changed()
        return lease

    def unclaimed(self, name: str, within_s: float) -> ClientLease | None:
        """A grant whose caller had gone: expires within `within_s` unless a client claims
        it first (a retry that joined the same acquire, a renewal)."""
        lease = self._leases.get(name)
        if lease is None or not lease.active or lease.claimed:
            return None
        lease = dataclasses.replace(lease, expires=min(lease.expires,
                                                       time.monotonic() + within_s))
        self._leases[name] = lease
        self._changed()
        return lease

    def drop_pending(self, name: str) -> None:
        lease = self._leases.get(name)
        if lease is not None and not lease.active:
            del self._leases[name]
            self._changed()

    def release(self, name: str) -> ClientLease | None:
        """End an active lease; a pending one (an acquire in flight) is left to its acquire."""
        lease = self._leases.get(name)
        if lease is None or not lease.active:
            return None
        del self._leases[name]
        self._changed()
        return lease

    def lose(self, name: str, reason: str) -> ClientLease | None:
        """The lease's client no longer has the GPU (the lock went to someone else): out of
        the books, remembered as lost for its next renewal."""
        lease = self._leases.pop(name, None)
        if lease is None:
            return None
        self._lost[name] = LostLease(lease, reason, time.time())
        while len(self._lost) > LOST_KEPT:
            self._lost.popitem(last=False)
        self._changed()
        return lease if lease.active else None

    def expired(self, now: float) -> list[ClientLease]:
        return [x for x in self._leases.values() if x.active and x.expires < now]
