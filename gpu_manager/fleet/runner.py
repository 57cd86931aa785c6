"""The fleet seen from any of its daemons: every host's status, and requests placed on the
host whose own planner has room (`placement.py` chooses from their dry runs).

A placed request runs on its host as an ordinary request of that daemon. Its dry run may be
stale by then (another request took the room): that host refuses (409) and the request is
placed again without it, at most `fleet.attempts` places in all. A host whose request was
sent but not answered is not tried again elsewhere: it may still be running there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpu_manager.config.fleet import FleetConfig
from gpu_manager.fleet.members import Host, Membership, MembershipError
from gpu_manager.fleet.peers import Peers, Reply
from gpu_manager.fleet.placement import Option, Refused, choose, option, preemptions, refused


@dataclass(frozen=True, slots=True)
class Target:
    """What is placed: how each host is asked (its dry run) and told (the act).

    The act carries what the chosen host's dry run promised, `max_preempt` (the highest
    priority it preempted; -1: none), so a host whose room went meanwhile refuses (409)
    instead of preempting more than the placement chose to. A lease's act (`lease`) also
    waits for room only at the last place tried (`wait`), and all of it within `deadline`.
    """

    label: str  # for people: "phase 2", "service tts", "a lease of 8000 MB"
    plan_path: str
    act_path: str
    plan_body: Any = None
    act_body: Any = None
    unknown: str = "unknown_service"  # the code of a host that does not declare it
    lease: bool = False
    deadline: float | None = None  # time.monotonic(): a lease's timeout

    def act(self, chosen: Option, last: bool, margin_s: float,
            default_s: float) -> tuple[Any, dict[str, str], float]:
        """(body, query, HTTP timeout) of the act on the host `chosen` names."""
        limit = chosen.cost[0]
        if not self.lease:
            return self.act_body, {"max_preempt": str(limit)}, default_s
        left = max(0.0, (self.deadline or time.monotonic()) - time.monotonic())
        body = {**(self.act_body or {}), "max_preempt": limit, "wait": last,
                "timeout_ms": int(left * 1000)}
        return body, {}, left + margin_s


class FleetError(Exception):
    """No host took it: `code`, every host's answer, the status to answer with."""

    def __init__(self, code: str, detail: str, status: int, **extra: Any) -> None:
        super().__init__(detail)
        self.code, self.detail, self.status, self.extra = code, detail, status, extra


@dataclass
class Placed:
    host: Host
    chosen: Option
    options: list[Option]
    refusals: list[Refused]
    attempts: list[Refused]  # the hosts that refused the act (their dry run was stale)
    reply: Reply | None = None  # the host's answer to the act (None: a dry run)

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host.name, "url": self.host.url, "node_id": self.host.node_id,
                "placement": {"chosen": self.chosen.as_dict(),
                              "options": [o.as_dict() for o in self.options],
                              "refused": [r.as_dict() for r in self.refusals],
                              "attempts": [a.as_dict() for a in self.attempts]}}


class Fleet:
    def __init__(self, cfg: FleetConfig, membership: Membership, peers: Peers) -> None:
        self.cfg = cfg
        self.membership = membership
        self.peers = peers
        # what else ends with the fleet (the routes' acquires in flight), first
        self.closers: list[Callable[[], Awaitable[None]]] = []

    async def hosts(self) -> list[Host]:
        try:
            return await self.membership.hosts()
        except MembershipError as exc:
            raise FleetError("fleet_unavailable", str(exc), 503) from exc

    async def status(self) -> dict[str, Any]:
        """Every host: reachability, VRAM per card, services, leases. A host whose Ray node
        is dead is not asked (its daemon may still answer, but nothing can be placed there)."""
        try:
            hosts = await self.membership.hosts()
        except MembershipError as exc:
            return {"enabled": True, "host": self.cfg.host, "address": self.cfg.address,
                    "membership": {"ok": False, "error": str(exc)}, "hosts": []}
        replies = await asyncio.gather(*(
            self.peers.call(h, "GET", "/gpu/status") for h in hosts if h.alive))
        by_name = {r.host.name: r for r in replies}
        return {"enabled": True, "host": self.cfg.host, "address": self.cfg.address,
                "membership": {"ok": True, "error": None},
                "hosts": [_host_status(h, by_name.get(h.name)) for h in hosts]}

    async def place(self, target: Target, *, dry_run: bool = False,
                    exclude: frozenset[str] = frozenset()) -> Placed:
        """Ask, choose, act (unless `dry_run`); again without a host that refused its act,
        while places, hosts and the target's deadline last."""
        attempts: list[Refused] = []
        left_out = set(exclude)
        for n in range(1, self.cfg.attempts + 1):
            placed = await self._choose(target, left_out, attempts)
            if dry_run:
                return placed
            last = n == self.cfg.attempts or len(placed.options) == 1
            body, params, timeout = target.act(placed.chosen, last, self.cfg.peer_timeout_s,
                                               self.cfg.operation_timeout_s)
            reply = await self.peers.call(placed.host, "POST", target.act_path, json=body,
                                          params=params, timeout_s=timeout)
            if reply.status == 409 or not reply.sent:  # stale, or it went away: elsewhere
                attempts.append(refused(placed.host.name, reply.status, reply.body,
                                        reply.error))
                left_out.add(placed.host.name)
                if target.deadline is not None and time.monotonic() >= target.deadline:
                    break
                continue
            placed.reply = reply
            return placed
        tried = [a.as_dict() for a in attempts]
        raise FleetError("insufficient_vram", f"no host of the fleet took {target.label}: "
                         + "; ".join(f"{a.host}: {_why(a)}" for a in attempts), 409,
                         hosts=tried, attempts=tried)

    async def _choose(self, target: Target, exclude: set[str],
                      attempts: list[Refused]) -> Placed:
        hosts = [h for h in await self.hosts() if h.name not in exclude]
        live = [h for h in hosts if h.alive]
        replies = await asyncio.gather(*(
            self.peers.call(h, "POST", target.plan_path, json=target.plan_body) for h in live))
        refusals = [Refused(h.name, "host_down", "its Ray node is dead") for h in hosts
                    if not h.alive]
        plans: dict[str, Mapping[str, Any]] = {}
        for r in replies:
            if r.ok and isinstance(r.body, Mapping) and isinstance(r.body.get("plan"), Mapping):
                plans[r.host.name] = r.body["plan"]
            else:
                refusals.append(refused(r.host.name, r.status, r.body, r.error))
        priorities = await self._priorities([h for h in live if h.name in plans
                                             and preemptions(plans[h.name])])
        options = [option(name, p, priorities.get(name, {})) for name, p in plans.items()]
        best = choose(options)
        if best is None:
            # every option went at the act: their refusals with the rest
            raise _no_host(target, refusals + attempts, attempts)
        host = next(h for h in live if h.name == best.host)
        return Placed(host, best, sorted(options, key=lambda o: o.host),
                      sorted(refusals, key=lambda r: r.host), attempts)

    async def _priorities(self, hosts: list[Host]) -> dict[str, dict[str, int]]:
        """The priorities of the services on hosts whose plan preempts (only needed when
        choosing between preemptions: most placements never ask)."""
        replies = await asyncio.gather(*(self.peers.call(h, "GET", "/gpu/status")
                                         for h in hosts))
        out: dict[str, dict[str, int]] = {}
        for r in replies:
            services = r.body.get("services") if r.ok and isinstance(r.body, Mapping) else None
            if isinstance(services, Mapping):
                out[r.host.name] = {n: int(s.get("priority", 0)) for n, s in services.items()
                                    if isinstance(s, Mapping)}
        return out

    async def aclose(self) -> None:
        for close in self.closers:
            await close()
        await self.peers.aclose()
        await self.membership.aclose()


def _no_host(target: Target, refusals: list[Refused], attempts: list[Refused]) -> FleetError:
    hosts = [r.as_dict() for r in sorted(refusals, key=lambda r: r.host)]
    why = "; ".join(f"{r.host}: {_why(r)}" for r in sorted(refusals, key=lambda r: r.host))
    asked = [r for r in refusals if r.error not in ("unreachable", "host_down", "bad_answer")]
    if not refusals:
        code, status, why = "fleet_unavailable", 503, "the fleet has no host"
    elif not asked:
        code, status = "fleet_unavailable", 503
    elif all(r.error == target.unknown for r in asked):
        code, status = target.unknown, 404
    else:
        code, status = "insufficient_vram", 409
    return FleetError(code, f"no host of the fleet can take {target.label}: {why}", status,
                      hosts=hosts, attempts=[a.as_dict() for a in attempts])


def _why(r: Refused) -> str:
    if r.error == "insufficient_vram" and r.short_mb:
        names = ", ".join(str(b.get("name")) for b in r.blockers) or "nothing stoppable"
        return f"{r.short_mb} MB short (blockers: {names})"
    return f"{r.error} ({r.detail})"


def _host_status(h: Host, reply: Reply | None) -> dict[str, Any]:
    out: dict[str, Any] = {"host": h.name, "url": h.url, "node_id": h.node_id,
                           "ray_alive": h.alive, "vram_resource_mb": h.vram_mb,
                           "reachable": False, "error": None, "vram": None, "gpus": [],
                           "services": {}, "leases": [], "phase": None}
    if not h.alive:
        out["error"] = "its Ray node is dead (failed Ray's health checks)"
    elif reply is None or not reply.ok or not isinstance(reply.body, Mapping):
        out["error"] = reply.error if reply is not None and reply.error else \
            f"its daemon answered HTTP {reply.status if reply else None}"
    else:
        body = reply.body
        vram = body.get("vram") or {}
        out.update(reachable=True, phase=body.get("phase"), leases=body.get("leases") or [],
                   gpus=body.get("gpus") or [],
                   vram={k: vram.get(k) for k in ("total_mb", "used_mb", "free_mb",
                                                  "available_mb", "reserve_mb")},
                   services={n: {k: s.get(k) for k in ("state", "priority", "vram_mb")}
                             for n, s in (body.get("services") or {}).items()
                             if isinstance(s, Mapping)})
    return out
