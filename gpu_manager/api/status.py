"""`GET /gpu/status`: built from the latest snapshot and cached state; it never waits on I/O.

The route sends `status()` through `api/status_cache.py`, which builds it again only when what
it reads changed (or after at most 100 ms): a field that no marker there covers calls
`daemon.status_cache.invalidate()` when a change must show at the next read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gpu_manager.orchestrator.cards import foreign_on
from gpu_manager.planner import ObservedState

if TYPE_CHECKING:  # only: the daemon holds the status cache, which imports this module
    from gpu_manager.daemon import Daemon


def vram(daemon: Daemon, observed: ObservedState) -> dict[str, Any]:
    orch = daemon.orchestrator
    snap = daemon.poller.latest
    gpu = daemon.inventory.gpu
    dev = snap.device(gpu.device)
    owner = orch.ledger.view().owner_of()
    total = dev.total_mb if dev and dev.total_mb is not None else gpu.total_mb
    free = dev.free_mb if dev else None
    if free is not None:
        available = max(0, free - gpu.reserve_mb)
    elif total is not None:  # degraded: what the declared budgets leave
        held = sum(u.cfg.vram_mb for u in list(daemon.units.values()) if u.holds_gpu)
        available = max(0, total - gpu.reserve_mb - held)
    else:
        available = None
    return {
        "total_mb": total,
        "used_mb": dev.used_mb if dev else None,
        "free_mb": free,
        "available_mb": available,
        "reserve_mb": gpu.reserve_mb,
        "processes": None if dev is None or dev.processes is None else [
            {"pid": p.pid, "name": p.name, "memory_mb": p.used_mb, "service": owner.get(p.pid)}
            for p in dev.processes
        ],
        "temperature_c": dev.temperature_c if dev else None,
        "utilization_percent": dev.utilization_percent if dev else None,
        "device": gpu.device,
        "source": snap.source,
        "error": snap.error or (dev.error if dev else None),
        "foreign_mb": foreign_on(observed, gpu.device)
        if dev and dev.used_mb is not None else None,
        "devices": [d.as_dict() for d in snap.devices],
        "updated_at": snap.wall_time,
    }


def services(daemon: Daemon) -> dict[str, Any]:
    orch = daemon.orchestrator
    books = orch.ledger.view()
    inv = daemon.inventory
    out: dict[str, Any] = {}
    no_sleep = orch.no_sleep()
    for name, unit in list(daemon.units.items()):
        # A unit no longer in the inventory is one whose removal could not stop it: shown
        # (it still holds VRAM) with its last definition, and `removed: true`.
        cfg = inv.services.get(name, unit.cfg)
        out[name] = {
            "state": unit.state.value,
            "vram_mb": cfg.vram_mb,
            "priority": cfg.priority,
            "phases": inv.phases_of(name),
            "type": cfg.type,
            "preemptible": cfg.preemptible,
            "measured_mb": orch.measured(name) if unit.holds_gpu else None,
            "pids": list(books.unit_pids.get(name, ())),
            "pids_error": books.pid_errors.get(name),
            # how it sleeps (its `sleep:` api) and what it keeps asleep; None: it cannot
            "sleep": cfg.sleep.api if cfg.sleep else None,
            # why its sleep cannot be used on this host (the plan stops it instead)
            "sleep_unavailable": no_sleep.get(name),
            "residual_mb": cfg.residual_mb,
            # what its sleep holds in host RAM (measured once it slept; declared until then)
            "host_ram_mb": orch.host_ram_of(name) if cfg.sleep else None,
            "host_ram_measured": name in orch.host_ram,
            # learned: the median of its measured starts, wakes, sleeps, stops, reclaim waits
            "costs": orch.costs.of(name),
            "prewarmed": name in orch.followups.live(),
            "sleeps": unit.sleeps,
            "wakes": unit.wakes,
            **({"removed": True} if name not in inv.services else {}),
            "devices": list(orch.cards_of(name)) if unit.holds_gpu or unit.devices else [],
            "allowed_devices": (None if cfg.allowed_devices is None
                                else list(cfg.allowed_devices)),
            "gpus": cfg.gpus,
            # the front door's figures (requests in flight, queue, idle timer); None: not served
            "serve": daemon.door.serve_status(name) if daemon.door is not None else None,
            **{k: v for k, v in unit.snapshot().items() if k != "state"},
        }
    return out


def gpus(daemon: Daemon, observed: ObservedState) -> list[dict[str, Any]]:
    """Each managed card: its numbers, and who holds what on it."""
    orch = daemon.orchestrator
    snap = daemon.poller.latest
    out = []
    for card in daemon.inventory.gpu.managed:
        dev = snap.device(card.index)
        free = dev.free_mb if dev else None
        foreign = foreign_on(observed, card.index) \
            if dev is not None and dev.used_mb is not None else None
        held = {n: orch.measured(n, snap, card.index) for n, u in list(daemon.units.items())
                if u.holds_gpu and card.index in orch.cards_of(n)}
        out.append({
            "index": card.index, "uuid": dev.uuid if dev else None,
            "name": dev.name if dev else None,
            "total_mb": dev.total_mb if dev and dev.total_mb is not None else card.total_mb,
            "used_mb": dev.used_mb if dev else None, "free_mb": free,
            "reserve_mb": card.reserve_mb,
            "available_mb": None if free is None else max(0, free - card.reserve_mb),
            "foreign_mb": foreign,
            "temperature_c": dev.temperature_c if dev else None,
            "utilization_percent": dev.utilization_percent if dev else None,
            "services": held,
        })
    return out


def held_for(daemon: Daemon) -> dict[str, Any]:
    """Who holds the GPU lock and why: the backend's holder when it is not this daemon
    (legacy code, another daemon: even while this daemon's holders think they hold it, the
    loss not yet settled), else from the daemon's own books (now, not the label the lock was
    first taken under, which the key keeps while leases come and go): operations in flight,
    client leases, or nobody."""
    orch = daemon.orchestrator
    info = daemon.lock_info
    keeper = orch.keeper
    holders = keeper.holders
    running = {op.label: op for op in orch.ops.in_flight()}
    operations = [{"id": running[h].id, "label": h} for h in sorted(holders) if h in running]
    leases = sorted(h.removeprefix("lease:") for h in holders if h.startswith("lease:"))
    someone_else = info.holder is not None and not keeper.owns(info.holder) \
        and not keeper.owned(info.holder)
    if someone_else:
        kind = "legacy"
    elif holders:
        kind = "unknown" if keeper.doubt is not None else \
            "operation" if operations and not leases else \
            "leases" if leases and not operations else "daemon"
    elif info.holder is not None:
        kind = "releasing"  # the daemon dropped it; the backend has not been read since
    else:
        kind = "none" if info.ok else "unknown"
    return {"kind": kind, "operations": operations, "leases": leases,
            "legacy": info.holder if kind == "legacy" else None,
            **({"doubt": keeper.doubt} if keeper.doubt is not None else {})}


def lock(daemon: Daemon) -> dict[str, Any]:
    info = daemon.lock_info
    return {
        "held_for": held_for(daemon),
        "holder": info.holder,
        "ttl": round(info.ttl_ms / 1000, 3) if info.ttl_ms is not None else None,
        "ttl_ms": info.ttl_ms,
        "backend": info.backend,
        "by_daemon": info.by_daemon,
        "ok": info.ok,
        "error": info.error,
        "checked_at": daemon.lock_checked_at,
    }


def host(daemon: Daemon) -> dict[str, Any]:
    """The host RAM that sleeping services fill: what they hold, what is left for more."""
    orch = daemon.orchestrator
    held = sum(orch.host_ram_of(n) for n, u in list(daemon.units.items())
               if u.state.value == "sleeping")
    cfg = daemon.inventory.host
    return {"ram_free_mb": orch.host_free_mb(), "ram_reserve_mb": cfg.ram_reserve_mb,
            "held_by_sleepers_mb": held,
            "simulated": cfg.simulated_total_mb is not None}


def status(daemon: Daemon) -> dict[str, Any]:
    observed = daemon.orchestrator.observed()  # once: the bar and the cards agree
    return {
        "vram": vram(daemon, observed),
        "gpus": gpus(daemon, observed),
        "placement": daemon.inventory.gpu.placement,
        "host": host(daemon),
        "services": services(daemon),
        "lock": lock(daemon),
        "phase": daemon.orchestrator.current_phase,
        "leases": [{"session_id": x.session_id, "requester": x.requester, "vram_mb": x.vram_mb,
                    "priority": x.priority, "devices": list(x.devices)}
                   for x in daemon.leases.active],
        "waiting": daemon.leases.waiting,
        "sleeping": sorted(n for n, u in list(daemon.units.items())
                           if u.state.value == "sleeping"),
        "prewarmed": sorted(daemon.orchestrator.followups.live()),
        "operations": [op.id for op in daemon.orchestrator.ops.in_flight()],
        "phases": {str(n): {"name": p.name, "services": list(p.services), "keep": list(p.keep),
                            "next": p.next}
                   for n, p in sorted(daemon.inventory.phases.items())},
    }
