"""The preemption planner: `plan(inventory, state, request) -> Plan | Refusal`.

Pure: no I/O, no logging, no clock, so it can be property-tested and called on every request.

Rules
- A running service occupies max(declared, measured) MB; budget = total - reserve - foreign.
- Stops come before starts, so if the end state fits, every intermediate state fits too.
- A start preempts only running, preemptible services of strictly lower priority. Victims are
  chosen to (1) keep the highest preempted priority as low as possible, then (2) stop as few
  services as possible, then (3) prefer lower priority and smaller services among equal choices.
- A phase stops every running service it neither lists nor keeps, starts what it lists (in the
  listed order), and keeps `keep:` services only while they fit; when they do not, the kept ones
  are stopped by the same victim rule (a non-preemptible kept service is never stopped).
- Stops run lowest priority first, so an interrupted plan leaves the most important running.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from gpu_manager.planner.model import (
    Blocker,
    ObservedState,
    Plan,
    PlannerInventory,
    PreparePhase,
    Refusal,
    Request,
    StartService,
    Step,
    StopAll,
    StopService,
)

FOREIGN = "(foreign)"
# Why a failed service whose process lingers is stopped before it is started again.
AGAIN = "failed, and its process is still running: stop it, then start it again"


def plan(inv: PlannerInventory, state: ObservedState, request: Request) -> Plan | Refusal:
    match request:
        case StartService():
            return _plan_start(inv, state, request)
        case StopService():
            return _plan_stop(inv, state, request)
        case PreparePhase():
            return _plan_phase(inv, state, request)
        case StopAll():
            victims = [n for n in (*state.running, *sorted(state.idle - set(state.running)))
                       if n in inv.services and inv.services[n].stoppable]
            steps = [_stop(inv, state, n, "release all") for n in _stop_order(inv, state, victims)]
            return _finish(inv, state, request, steps)


def usage_mb(inv: PlannerInventory, state: ObservedState, name: str) -> int:
    """MB a running service is counted for: the larger of declared and measured (an idle
    one: what it still holds, usually nothing)."""
    if name in state.idle and name not in state.running:
        return 0
    measured = state.running.get(name)
    spec = inv.services.get(name)
    declared = spec.vram_mb if spec is not None else 0
    return max(declared, measured or 0)


def used_mb(inv: PlannerInventory, state: ObservedState) -> int:
    return sum(usage_mb(inv, state, n) for n in state.running)


def choose_victims(candidates: Sequence[tuple[str, int, int]], shortfall: int) -> list[str] | None:
    """Pick services to stop among (name, mb, priority) so that they free >= shortfall MB.

    Returns None when even all candidates are not enough. See the module docstring for the
    order of preferences; this runs in O(k * n log n) for k victims out of n candidates.
    """
    if shortfall <= 0:
        return []
    if sum(mb for _, mb, _ in candidates) < shortfall:
        return None
    # (1) the lowest priority ceiling that can free enough
    by_prio = sorted(candidates, key=lambda c: c[2])
    acc = 0
    ceiling = by_prio[-1][2]
    for _, mb, prio in by_prio:
        acc += mb
        if acc >= shortfall:
            ceiling = prio
            break
    # Everything at the ceiling priority is usable, not just the prefix we summed.
    pool = [c for c in candidates if c[2] <= ceiling]
    if sum(mb for _, mb, _ in pool) < shortfall:  # pragma: no cover - guaranteed above
        return None
    # (2) the fewest victims: the largest-first prefix is the minimum count
    k = _min_count(sorted((mb for _, mb, _ in pool), reverse=True), shortfall)
    # (3) fill k slots by preference, keeping the rest of the slots feasible
    prefer = sorted(pool, key=lambda c: (c[2], c[1], c[0]))
    chosen: list[str] = []
    taken: set[str] = set()
    freed = 0
    for slot in range(k):
        left = k - slot - 1
        remaining = sorted((c for c in pool if c[0] not in taken), key=lambda c: -c[1])
        top = sum(mb for _, mb, _ in remaining[:left])
        boundary = remaining[left][1] if left < len(remaining) else 0
        for name, mb, _ in prefer:
            if name in taken:
                continue
            # The best the other `left` slots can add without this candidate.
            rest = top - mb + boundary if _in_top(remaining, name, left) else top
            if freed + mb + rest >= shortfall:
                chosen.append(name)
                taken.add(name)
                freed += mb
                break
    return chosen


def _min_count(sizes_desc: Iterable[int], shortfall: int) -> int:
    acc = 0
    for i, mb in enumerate(sizes_desc, start=1):
        acc += mb
        if acc >= shortfall:
            return i
    raise ValueError("not enough to cover the shortfall")  # pragma: no cover


def _in_top(remaining: Sequence[tuple[str, int, int]], name: str, left: int) -> bool:
    return any(c[0] == name for c in remaining[:left])


def _stop_order(inv: PlannerInventory, state: ObservedState, names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (inv.services[n].priority, -usage_mb(inv, state, n), n))


def _stop(
    inv: PlannerInventory, state: ObservedState, name: str, reason: str, preemption: bool = False
) -> Step:
    return Step("stop", name, usage_mb(inv, state, name), reason, preemption)


def _finish(
    inv: PlannerInventory, state: ObservedState, request: Request, steps: Sequence[Step]
) -> Plan:
    before = used_mb(inv, state)
    after = before + sum(s.mb if s.action == "start" else -s.mb for s in steps)
    return Plan(request, _edges(state.budget_mb - before, steps), state.budget_mb, before,
                after)


def _edges(free: int, steps: Sequence[Step]) -> tuple[Step, ...]:
    """Say which stops each start waits for, so that any order the graph allows stays
    within the budget.

    Each start's MB is covered, in plan order, first by the room that is free now, then by
    the stops' freed MB (a stop's MB may be split between starts): the stops it draws on
    become its dependencies. A deficit (more in use than the budget, e.g. foreign memory
    grew) is repaid first, by the first stops; every start that needs any stop's MB waits
    for those too. Since the covering portions are disjoint, a start never runs on MB that
    another start, or something still running, counts on.
    """
    stops = [(i, s.mb) for i, s in enumerate(steps) if s.action == "stop"]
    left = dict(stops)
    owed: set[int] = set()
    debt = max(0, -free)
    for i, _ in stops:
        if debt <= 0:
            break
        take = min(left[i], debt)
        left[i] -= take
        debt -= take
        owed.add(i)
    room = max(0, free)
    out: list[Step] = []
    for step in steps:
        if step.action != "start":
            out.append(step)
            continue
        deps = {i for i, _ in stops if steps[i].service == step.service}  # started again
        need = step.mb - min(room, step.mb)
        room -= step.mb - need
        drew = need > 0
        for i, _ in stops:
            if need <= 0:
                break
            if left[i] > 0:
                take = min(left[i], need)
                left[i] -= take
                need -= take
                deps.add(i)
        if need > 0:  # not covered (a plan the planner would not make): wait for them all
            deps |= {i for i, _ in stops}
        if drew:
            deps |= owed
        out.append(dataclasses.replace(step, after=tuple(sorted(deps))))
    return tuple(out)


def _unknown_service(inv: PlannerInventory, request: Request, name: str) -> Refusal:
    known = ", ".join(sorted(n for n, s in inv.services.items() if s.stoppable)) or "(none)"
    return Refusal(request, "unknown_service", f"unknown service {name!r} (known: {known})")


def _candidates(
    inv: PlannerInventory, state: ObservedState, names: Iterable[str], below: int | None
) -> tuple[list[tuple[str, int, int]], list[Blocker]]:
    """Split running services into preemption candidates and blockers (with why)."""
    cands: list[tuple[str, int, int]] = []
    blockers: list[Blocker] = []
    for n in names:
        mb = usage_mb(inv, state, n)
        spec = inv.services.get(n)
        if spec is None:
            blockers.append(Blocker(n, mb, "not in the inventory"))
        elif not spec.stoppable:
            blockers.append(Blocker(n, mb, "held by a client"))
        elif not spec.preemptible:
            blockers.append(Blocker(n, mb, "not preemptible"))
        elif below is not None and spec.priority >= below:
            blockers.append(Blocker(n, mb, f"priority {spec.priority} >= {below}"))
        else:
            cands.append((n, mb, spec.priority))
    return cands, blockers


def _insufficient(
    state: ObservedState,
    request: Request,
    what: str,
    need: int,
    short: int,
    blockers: list[Blocker],
) -> Refusal:
    if state.foreign_mb > 0:
        blockers.append(
            Blocker(FOREIGN, state.foreign_mb, "used by processes gpu-manager does not manage")
        )
    blockers.sort(key=lambda b: -b.mb)
    who = ", ".join(f"{b.name} ({b.mb} MB, {b.reason})" for b in blockers) or "nothing"
    msg = (
        f"cannot fit {what} ({need} MB): {short} MB short of a {state.budget_mb} MB budget "
        f"(total {state.total_mb} - reserve {state.reserve_mb} - foreign {state.foreign_mb}); "
        f"blocked by {who}"
    )
    return Refusal(request, "insufficient_vram", msg, tuple(blockers), short)


def _plan_start(inv: PlannerInventory, state: ObservedState, req: StartService) -> Plan | Refusal:
    spec = inv.services.get(req.name)
    if spec is None:
        return _unknown_service(inv, req, req.name)
    if req.name in state.running and req.name not in state.unready:
        return _finish(inv, state, req, [])
    if req.name in state.running:  # failed, with a process left: stop it, start it again
        return _finish(inv, state, req, [_stop(inv, state, req.name, AGAIN),
                                         Step("start", req.name, spec.vram_mb, "requested")])
    free = state.budget_mb - used_mb(inv, state)
    shortfall = spec.vram_mb - free
    cands, blockers = _candidates(inv, state, state.running, below=spec.priority)
    victims = choose_victims(cands, shortfall)
    if victims is None:
        short = shortfall - sum(mb for _, mb, _ in cands)
        return _insufficient(state, req, req.name, spec.vram_mb, short, blockers)
    steps = [
        _stop(inv, state, v,
              f"preempted by {req.name} (priority {inv.services[v].priority} < {spec.priority})",
              preemption=True)
        for v in _stop_order(inv, state, victims)
    ]
    steps.append(Step("start", req.name, spec.vram_mb, "requested"))
    return _finish(inv, state, req, steps)


def _plan_stop(inv: PlannerInventory, state: ObservedState, req: StopService) -> Plan | Refusal:
    if req.name not in inv.services or not inv.services[req.name].stoppable:
        return _unknown_service(inv, req, req.name)
    if req.name not in state.running and req.name not in state.idle:
        return _finish(inv, state, req, [])
    phase = inv.phases.get(state.current_phase) if state.current_phase is not None else None
    if phase is not None and req.name in phase.services and not req.force:
        label = f"phase {phase.number}" + (f" ({phase.name})" if phase.name else "")
        return Refusal(req, "needed_by_phase",
                       f"{req.name} is needed by the current {label}; pass force=true to stop it")
    return _finish(inv, state, req, [_stop(inv, state, req.name, "requested")])


def _plan_phase(inv: PlannerInventory, state: ObservedState, req: PreparePhase) -> Plan | Refusal:
    phase = inv.phases.get(req.phase)
    if phase is None:
        known = ", ".join(str(n) for n in sorted(inv.phases)) or "(none)"
        return Refusal(req, "unknown_phase", f"unknown phase {req.phase} (known: {known})")
    for name in (*phase.services, *phase.keep):
        if name not in inv.services:
            return _unknown_service(inv, req, name)
    label = f"phase {phase.number}" + (f" ({phase.name})" if phase.name else "")
    wanted = set(phase.services)
    keep = set(phase.keep)
    managed = [n for n in state.running if n in inv.services and inv.services[n].stoppable]
    unlisted = [n for n in managed if n not in wanted and n not in keep]
    steps = [_stop(inv, state, n, f"not in {label}") for n in _stop_order(inv, state, unlisted)]
    again = [n for n in phase.services if n in state.running and n in state.unready]
    steps += [_stop(inv, state, n, AGAIN) for n in again]
    to_start = [n for n in phase.services if n not in state.running or n in again]
    need = sum(inv.services[n].vram_mb for n in to_start)
    used = used_mb(inv, state) - sum(s.mb for s in steps)
    shortfall = need - (state.budget_mb - used)
    kept = [n for n in managed if n in keep]
    cands, blockers = _candidates(inv, state, kept, below=None)
    victims = choose_victims(cands, shortfall)
    if victims is None:
        short = shortfall - sum(mb for _, mb, _ in cands)
        blockers += [Blocker(n, usage_mb(inv, state, n), f"needed by {label}")
                     for n in state.running if n in wanted]
        blockers += [Blocker(n, usage_mb(inv, state, n), "not in the inventory")
                     for n in state.running if n not in inv.services]
        blockers += [Blocker(n, usage_mb(inv, state, n), "held by a client")
                     for n in state.running
                     if n in inv.services and not inv.services[n].stoppable]
        what = f"{label}: " + ", ".join(to_start) if to_start else label
        return _insufficient(state, req, what, need, short, blockers)
    steps += [_stop(inv, state, v, f"kept by {label} but does not fit beside it", preemption=True)
              for v in _stop_order(inv, state, victims)]
    steps += [Step("start", n, inv.services[n].vram_mb, f"needed by {label}") for n in to_start]
    return _finish(inv, state, req, steps)
