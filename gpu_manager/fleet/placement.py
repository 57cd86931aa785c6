"""Where a request goes: pure, from every host's own dry run (no I/O here).

Each host's planner is the judge of its VRAM; placement only compares their answers:
1. a host where the request fits without preempting anything, best fit by VRAM (the least
   room left after it, so large holes stay free for large requests);
2. else the host whose preemption is cheapest: the lowest highest priority preempted, then
   the fewest releases, then best fit;
3. else none: the refusal lists every host and why (its blockers, the MB short, or that it
   could not be asked).
Ties go to the host name, so the same answers always give the same host.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RELEASE_ACTIONS = ("stop", "sleep")


@dataclass(frozen=True, slots=True)
class Option:
    """A host whose dry run said yes."""

    host: str
    free_after_mb: int
    preempted: tuple[tuple[str, int], ...] = ()  # (service, its priority) the plan releases

    @property
    def cost(self) -> tuple[int, int]:
        """(highest priority preempted, how many): the lower, the cheaper."""
        if not self.preempted:
            return (-1, 0)
        return (max(p for _, p in self.preempted), len(self.preempted))

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "free_after_mb": self.free_after_mb,
                "preempts": [{"service": s, "priority": p} for s, p in self.preempted]}


@dataclass(frozen=True, slots=True)
class Refused:
    """A host that said no, or could not be asked."""

    host: str
    error: str  # the host's code (insufficient_vram, unknown_phase, ...) or unreachable
    detail: str
    short_mb: int | None = None
    blockers: tuple[Mapping[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "error": self.error, "detail": self.detail,
                "short_mb": self.short_mb, "blockers": list(self.blockers)}


def preemptions(plan: Mapping[str, Any]) -> list[str]:
    """The services a host's plan (its dry run's `plan`) releases to make room."""
    return [s["service"] for s in plan.get("steps", ())
            if s.get("preemption") and s.get("action") in RELEASE_ACTIONS]



def option(host: str, plan: Mapping[str, Any], priorities: Mapping[str, int]) -> Option:
    """`priorities`: the host's services' priorities (a lease's name is not among them:
    leases are never preempted, so an unknown name counts as the highest)."""
    victims = tuple((name, priorities.get(name, 1 << 30)) for name in preemptions(plan))
    return Option(host, int(plan.get("free_after_mb") or 0), victims)


def choose(options: list[Option]) -> Option | None:
    free = [o for o in options if not o.preempted]
    if free:
        return min(free, key=lambda o: (o.free_after_mb, o.host))
    if options:
        return min(options, key=lambda o: (*o.cost, o.free_after_mb, o.host))
    return None


def refused(host: str, status: int | None, body: Any, error: str | None) -> Refused:
    """A host's no, from its answer (or the reason there was none)."""
    if status is None:
        return Refused(host, "unreachable", error or "no answer")
    if not isinstance(body, Mapping):
        return Refused(host, "bad_answer", f"HTTP {status}")
    if "session_id" in body:  # the lease protocol's no: `error` is its message
        return Refused(host, "not_granted", str(body.get("error")))
    raw = body.get("plan")
    plan: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    detail = body.get("detail")
    return Refused(host, str(body.get("error") or f"http_{status}"),
                   detail if isinstance(detail, str) else str(detail),
                   body.get("short_mb", plan.get("short_mb")),
                   tuple(body.get("blockers") or plan.get("blockers") or ()))
