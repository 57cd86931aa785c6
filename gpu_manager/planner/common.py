"""What the planner's rules share: how much a service counts, victims, edges, refusals."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

from gpu_manager.planner.model import (
    RELEASES,
    Blocker,
    ObservedState,
    Plan,
    PlannerInventory,
    Refusal,
    Request,
    Step,
)

FOREIGN = "(foreign)"


def usage_mb(inv: PlannerInventory, state: ObservedState, name: str) -> int:
    """MB a running service is counted for: the larger of declared and measured (a sleeping
    one: its measured residual, or the declared one while the probe cannot tell)."""
    spec = inv.services.get(name)
    if name in state.sleeping and name not in state.running:
        asleep = state.sleeping[name]
        if asleep is not None:
            return asleep
        return (spec.residual_mb or 0) if spec is not None else 0
    measured = state.running.get(name)
    declared = spec.vram_mb if spec is not None else 0
    return max(declared, measured or 0)


def used_mb(inv: PlannerInventory, state: ObservedState) -> int:
    return sum(usage_mb(inv, state, n) for n in {*state.running, *state.sleeping})


def can_sleep(inv: PlannerInventory, state: ObservedState, name: str) -> bool:
    """Running, serving, and with a `sleep:` block."""
    spec = inv.services.get(name)
    return (spec is not None and spec.residual_mb is not None and name in state.running
            and name not in state.unready)


def sleep_frees(inv: PlannerInventory, state: ObservedState, name: str,
                deep: bool = False) -> int:
    """What a sleep frees, counted against the declared residual (the most it may keep); a
    deep sleep (its ladder's checkpoint) frees all of it."""
    residual = 0 if deep and inv.services[name].deep else inv.services[name].residual_mb or 0
    return max(0, usage_mb(inv, state, name) - residual)


def choose_victims(candidates: Sequence[tuple[str, int, int]], shortfall: int,
                   back_in: Mapping[str, float] | None = None) -> list[str] | None:
    """Pick services to stop among (name, mb, priority) so that they free >= shortfall MB.

    Returns None when even all candidates are not enough. See the module docstring for the
    order of preferences; `back_in` (learned seconds to bring each back) breaks ties within
    a priority: the cheapest to bring back goes first, the unmeasured last. This runs in
    O(k * n log n) for k victims out of n candidates.
    """
    cost = back_in or {}
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
    prefer = sorted(pool, key=lambda c: (c[2], cost.get(c[0], float("inf")), c[1], c[0]))
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


def stop_order(inv: PlannerInventory, state: ObservedState, names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda n: (inv.services[n].priority, -usage_mb(inv, state, n), n))


def release(
    inv: PlannerInventory, state: ObservedState, name: str, reason: str, preemption: bool = False,
    sleep: bool = False, deep: bool = False,
) -> Step:
    """Free `name`'s VRAM: put it to sleep (`sleep` and it can; `deep`: by its ladder's
    checkpoint where it has one), else stop it."""
    if sleep and can_sleep(inv, state, name):
        if deep and inv.services[name].deep:
            return Step("sleep", name, sleep_frees(inv, state, name, True),
                        f"{reason}; checkpointed: its sleep's residual does not fit",
                        preemption, how="checkpoint")
        return Step("sleep", name, sleep_frees(inv, state, name), reason, preemption)
    spec = inv.services.get(name)
    if sleep and spec is not None and spec.no_sleep:
        reason = f"{reason}; stopped, not asleep: {spec.no_sleep}"
    return Step("stop", name, usage_mb(inv, state, name), reason, preemption)


def acquire(inv: PlannerInventory, state: ObservedState, name: str, reason: str) -> Step:
    """Start `name`, or wake it when it sleeps (needing all but what it still holds)."""
    spec = inv.services[name]
    if name in state.sleeping and name not in state.running:
        return Step("wake", name, max(0, spec.vram_mb - usage_mb(inv, state, name)), reason)
    return Step("start", name, spec.vram_mb, reason)


def finish(
    inv: PlannerInventory, state: ObservedState, request: Request, steps: Sequence[Step]
) -> Plan:
    steps = host_ram(inv, state, steps)
    before = used_mb(inv, state)
    after = before + sum(-s.mb if s.action in RELEASES else s.mb for s in steps)
    return Plan(request, edges(state.budget_mb - before, steps), state.budget_mb, before,
                after)


def host_ram(inv: PlannerInventory, state: ObservedState, steps: Sequence[Step],
             stop_mb: Callable[[Step], int] | None = None) -> Sequence[Step]:
    """Sleeps fill the host's RAM: the host's free RAM goes to the sleeps of this plan by
    priority (highest first: the most important comes back fastest); a sleep it cannot hold
    becomes a stop, and says why. A stop frees more VRAM than the sleep would have, so the
    plan still fits the GPU."""
    left = state.host_free_mb
    if left is None or not any(s.action == "sleep" for s in steps):
        return steps

    deep = {s.service for s in steps if s.how == "checkpoint"}

    def need(name: str) -> int:
        spec = inv.services.get(name)
        if spec is None:
            return 0
        return spec.vram_mb if name in deep else spec.host_ram_mb  # a checkpoint parks all

    sleeps = sorted((s.service for s in steps if s.action == "sleep"),
                    key=lambda n: (-inv.services[n].priority if n in inv.services else 0, n))
    refused: dict[str, int] = {}
    for name in sleeps:
        if need(name) > left:
            refused[name] = left
        else:
            left -= need(name)
    return [step if step.action != "sleep" or step.service not in refused else
            dataclasses.replace(
                step, action="stop", how="", mb=stop_mb(step) if stop_mb is not None
                else usage_mb(inv, state, step.service),
                reason=f"{step.reason}; stopped, not asleep: host RAM (its sleep holds "
                       f"{need(step.service)} MB, {max(0, refused[step.service])} MB free)")
            for step in steps]


def edges(free: int, steps: Sequence[Step]) -> tuple[Step, ...]:
    """Say which stops each start waits for, so that any order the graph allows stays
    within the budget.

    Each start's MB is covered, in plan order, first by the room that is free now, then by
    the stops' freed MB (a stop's MB may be split between starts): the stops it draws on
    become its dependencies. A deficit (more in use than the budget, e.g. foreign memory
    grew) is repaid first, by the first stops; every start that needs any stop's MB waits
    for those too. Since the covering portions are disjoint, a start never runs on MB that
    another start, or something still running, counts on.
    """
    stops = [(i, s.mb) for i, s in enumerate(steps) if s.action in RELEASES]
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
        if step.action in RELEASES:
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


# The reason of a blocker kept for the requests in flight at the front door.
IN_FLIGHT = "requests in flight"


def unknown_service(inv: PlannerInventory, request: Request, name: str) -> Refusal:
    known = ", ".join(sorted(n for n, s in inv.services.items() if s.stoppable)) or "(none)"
    return Refusal(request, "unknown_service", f"unknown service {name!r} (known: {known})")


def candidates(
    inv: PlannerInventory, state: ObservedState, names: Iterable[str], below: int | None,
    sleep: bool = False, swap: bool = False, deep: bool = False,
) -> tuple[list[tuple[str, int, int]], list[Blocker]]:
    """Split running (or sleeping) services into preemption candidates, with the MB each
    frees (`sleep`: by sleeping where it can), and blockers (with why). `swap` (a start a
    request caused): a service of priority `below` itself is a candidate too while no
    request is in flight for it (`state.in_use`): models of one rank take turns."""
    cands: list[tuple[str, int, int]] = []
    blockers: list[Blocker] = []
    for n in names:
        mb = (sleep_frees(inv, state, n, deep) if sleep and can_sleep(inv, state, n)
              else usage_mb(inv, state, n))
        spec = inv.services.get(n)
        if spec is None:
            blockers.append(Blocker(n, mb, "not in the inventory"))
        elif not spec.stoppable:
            blockers.append(Blocker(n, mb, "held by a client"))
        elif not spec.preemptible:
            blockers.append(Blocker(n, mb, "not preemptible"))
        elif below is not None and spec.priority == below and swap and n in state.in_use:
            blockers.append(Blocker(n, mb, f"priority {spec.priority} >= {below}, "
                                    + IN_FLIGHT))
        elif below is not None and spec.priority >= below and not (
                swap and spec.priority == below):
            blockers.append(Blocker(n, mb, f"priority {spec.priority} >= {below}"))
        else:
            cands.append((n, mb, spec.priority))
    return cands, blockers


def insufficient(
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


