"""Several GPUs: which card a service goes to, and the plan on each card.

The single-card rules (`core`) stay the rule book. With two or more cards this module cuts
the observed state into one state per card (each service counted on the cards it holds,
its MB split evenly over them), decides where what must start goes, asks `core` for each
card's plan and merges them: one plan whose steps say their cards (`Step.devices`), whose
edges are each card's own (a start waits only for releases on its cards).

Placement of a start, best first:
1. where it already is: a sleeping service wakes where its residual is, a failed one with
   a process left restarts there; a running service is never moved;
2. a card where it fits without releasing anything; among those the fullest (`best_fit`,
   keeping whole cards free for large services) or the emptiest (`spread`);
3. a card where it fits after releasing, the cheapest release first: the lowest highest
   preempted priority, then the fewest releases, then the fewest MB, then the card's index.
A service that needs several cards (`gpus: 2`) takes the best `gpus` cards, or is refused.
A refusal names every card it could use and why each cannot take it.

A phase first places its services that do not run yet (largest need first, by the same
preference, counting what the phase keeps as movable only when nothing else fits), then
plans each card as a phase of its own: the services placed there, the kept ones there, and
the release of everything else running there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from gpu_manager.planner import core
from gpu_manager.planner.common import can_sleep, edges, sleep_frees, usage_mb, used_mb
from gpu_manager.planner.model import (
    RELEASES,
    Action,
    Blocker,
    ObservedState,
    Plan,
    PlannerInventory,
    PreparePhase,
    Prewarm,
    Refusal,
    RefusalCode,
    Request,
    ServiceSpec,
    StartService,
    Step,
)


def plan(inv: PlannerInventory, state: ObservedState, request: Request) -> Plan | Refusal:
    result = _plan(inv, state, request)
    limit = getattr(request, "max_preempt", None)
    if limit is None or isinstance(result, Refusal):
        return result
    over = [s for s in result.steps if s.preemption and s.action in RELEASES
            and (inv.services[s.service].priority if s.service in inv.services else 1 << 30)
            > limit]
    if not over:
        return result
    allowed_ = "nothing" if limit < 0 else f"up to priority {limit}"
    return Refusal(request, "insufficient_vram", (
        f"it would now preempt {', '.join(s.service for s in over)}, and the request allows "
        f"preempting {allowed_} (a placement made on an earlier plan)"),
        tuple(Blocker(s.service, s.mb, "its preemption is not allowed by the request",
                      s.devices[0] if len(s.devices) == 1 and len(state.devices) > 1
                      else None) for s in over),
        sum(s.mb for s in over))


def _plan(inv: PlannerInventory, state: ObservedState, request: Request) -> Plan | Refusal:
    if len(state.devices) < 2:
        return core.plan(inv, state, request)
    match request:
        case StartService():
            return _start(inv, state, request)
        case PreparePhase():
            return _phase(inv, state, request)
        case Prewarm():
            return _prewarm(inv, state, request)
        case _:  # stops, sleeps: nothing to place; the sums are the budget
            result = core.plan(inv, state, request)
            if isinstance(result, Refusal):
                return result
            steps = tuple(dataclasses.replace(s, devices=where(state, s.service))
                          for s in result.steps)
            return dataclasses.replace(result, steps=steps)


def where(state: ObservedState, name: str) -> tuple[int, ...]:
    """The cards `name` holds (unplaced: the first card, the primary one, where a
    single-card daemon put it)."""
    return state.placement.get(name) or (next(iter(state.devices)),)


def allowed(spec: ServiceSpec, state: ObservedState) -> list[int]:
    """The managed cards `spec` may be placed on, in index order."""
    return [d for d in (spec.devices or sorted(state.devices)) if d in state.devices]


def card(state: ObservedState, d: int) -> ObservedState:
    """Card `d` alone: its budget, and each service on it with its share."""
    budget = state.devices[d]

    def share(name: str, mb: int | None) -> int | None:
        measured = state.card_mb.get(name)
        if measured is not None and d in measured:
            return measured[d]
        return None if mb is None else -(-mb // len(where(state, name)))

    running = {n: share(n, mb) for n, mb in state.running.items() if d in where(state, n)}
    sleeping = {n: share(n, mb) for n, mb in state.sleeping.items() if d in where(state, n)}
    return ObservedState(budget.total_mb, running, budget.reserve_mb, budget.foreign_mb,
                         state.current_phase, sleeping, state.unready & running.keys(),
                         in_use=state.in_use)


def _cost(inv: PlannerInventory, state: ObservedState, d: int,
          result: Plan) -> tuple[bool, float, int, int, int, int]:
    releases = result.stops
    worst = max((inv.services[s.service].priority for s in releases
                 if s.service in inv.services), default=float("-inf"))
    free = result.free_after_mb
    fit = free if state.strategy == "best_fit" else -free
    return (bool(releases), worst, len(releases), sum(s.mb for s in releases), fit, d)


def _start(inv: PlannerInventory, state: ObservedState, req: StartService) -> Plan | Refusal:
    spec = inv.services.get(req.name)
    if spec is None:
        return core.plan(inv, state, req)  # unknown: the refusal lists the known
    if req.name in state.running and req.name not in state.unready:
        return _merge(inv, state, req, [])
    placed = req.name in state.running or req.name in state.sleeping
    if placed:
        cards: Iterable[int] = where(state, req.name)  # its process is there: not moved
        lost = _unmanaged(state, req, req.name)
        if lost is not None:
            return lost
    else:
        cards = allowed(spec, state)
    states = {d: card(state, d) for d in state.devices}
    options = {d: core.plan(inv, states[d], req) for d in cards}
    fitting = sorted((_cost(inv, state, d, r), d) for d, r in options.items()
                     if isinstance(r, Plan))
    need = len(options) if placed else spec.gpus
    if len(fitting) < need:
        refused = {d: r for d, r in options.items() if isinstance(r, Refusal)}
        return _refuse(req, req.name, spec.vram_mb, spec.gpus, refused,
                       [d for _, d in fitting], lacking=need - len(fitting))
    chosen = {d for _, d in fitting[:need]}
    return _merge(inv, state, req, [(d, r) for d, r in sorted(options.items())
                                    if d in chosen and isinstance(r, Plan)], states)


def _unmanaged(state: ObservedState, req: Request, name: str) -> Refusal | None:
    """A service whose process sits on a card not managed (any more: the cards were edited
    and the daemon restarted): nothing can be planned for it there but its stop."""
    off = [d for d in where(state, name) if d not in state.devices]
    if not off:
        return None
    known = ", ".join(map(str, sorted(state.devices)))
    return Refusal(req, "unmanaged_device", f"{name} runs on GPU {', '.join(map(str, off))}, "
                   f"which this daemon does not manage (gpu devices: {known}); stop it, and "
                   "it starts on a managed card next time")


def _refuse(req: Request, what: str, need: int, gpus: int, refused: dict[int, Refusal],
            could: Sequence[int], lacking: int = 1) -> Refusal:
    """`lacking`: how many of the refusing cards must be made to fit (their smallest
    shortfalls add up to `short_mb`): the cards a `gpus: k` start still needs, every card of
    a phase."""
    if not refused:  # no card it may use at all
        return Refusal(req, "insufficient_vram", f"cannot fit {what}: no card it may use "
                       "is managed by this daemon", (), need)
    each = f" on each of {gpus} cards" if gpus > 1 else ""
    told = "; ".join(f"GPU {d}: {r.message}" for d, r in sorted(refused.items()))
    partial = f"; it needs {gpus} cards and only GPU {', '.join(map(str, could))} can " \
              "take it now" if could else ""
    code: RefusalCode = next((r.code for r in refused.values()
                              if r.code != "insufficient_vram"), "insufficient_vram")
    blockers = tuple(dataclasses.replace(b, device=d)
                     for d, r in sorted(refused.items()) for b in r.blockers)
    short = sum(sorted(r.short_mb for r in refused.values())[:max(1, lacking)])
    return Refusal(req, code, f"cannot fit {what} ({need} MB{each}) on any card it may "
                   f"use{partial}: {told}", blockers, short)


def _merge(inv: PlannerInventory, state: ObservedState, req: Request,
           parts: Sequence[tuple[int, Plan]],
           states: dict[int, ObservedState] | None = None) -> Plan:
    """One plan of the cards' plans: releases first, a step on several cards once (its
    edges the union of each card's). A release frees the service on all its cards, whichever
    card asked for it, and a service one card sleeps and another stops is stopped: one
    release per service."""
    states = states or {d: card(state, d) for d in state.devices}
    keys: list[tuple[Action, str]] = []
    merged: dict[tuple[Action, str], Step] = {}
    cards: dict[tuple[Action, str], set[int]] = {}
    stopped = {s.service for _, part in parts for s in part.steps if s.action == "stop"}

    def key_of(step: Step) -> tuple[Action, str]:
        if step.action == "sleep" and step.service in stopped:
            return ("stop", step.service)
        return (step.action, step.service)

    for phase in (True, False):  # releases, then starts and wakes
        for d, part in parts:
            for step in part.steps:
                if (step.action in RELEASES) != phase:
                    continue
                key = key_of(step)
                if key in merged:
                    old = merged[key]
                    merged[key] = dataclasses.replace(
                        old, mb=old.mb + step.mb, preemption=old.preemption or step.preemption)
                else:
                    keys.append(key)
                    merged[key] = dataclasses.replace(step, action=key[0])
                cards.setdefault(key, set()).add(d)
    index = {k: i for i, k in enumerate(keys)}
    after: dict[tuple[Action, str], set[int]] = {k: set() for k in keys}
    for _, part in parts:
        for step in part.steps:
            after[key_of(step)] |= {index[key_of(part.steps[i])] for i in step.after}
    steps = []
    for k in keys:
        step = merged[k]
        if step.action in RELEASES:
            on = tuple(sorted(set(where(state, step.service)) | cards[k]))
            deep = step.how == "checkpoint"
            mb = sum(sleep_frees(inv, states[d], step.service, deep) if step.action == "sleep"
                     else usage_mb(inv, states[d], step.service) for d in on if d in states)
            step = dataclasses.replace(step, mb=mb)
        else:
            on = tuple(sorted(cards[k]))
        steps.append(dataclasses.replace(step, devices=on, after=tuple(sorted(after[k]))))
    # sleeps the host cannot hold are stops (on every card they hold)
    steps = list(core.host_ram(inv, state, steps, lambda s: sum(
        usage_mb(inv, states[d], s.service) for d in s.devices if d in states)))
    before = sum(used_mb(inv, s) for s in states.values())
    after_mb = before + sum(-s.mb if s.action in RELEASES else s.mb for s in steps)
    budget = sum(s.budget_mb for s in states.values())
    return Plan(req, tuple(steps), budget, before, after_mb)


def _phase(inv: PlannerInventory, state: ObservedState, req: PreparePhase) -> Plan | Refusal:
    phase = inv.phases.get(req.phase)
    if phase is None or any(n not in inv.services for n in (*phase.services, *phase.keep)):
        return core.plan(inv, state, req)  # the refusal
    present = {*state.running, *state.sleeping}
    for name in phase.services:
        lost = _unmanaged(state, req, name) if name in present else None
        if lost is not None:
            return lost
    assign = {n: where(state, n) for n in phase.services if n in present}
    states = {d: card(state, d) for d in state.devices}  # cut once: O(services) each
    hard = dict.fromkeys(state.devices, 0)  # what stays whatever happens
    soft = dict.fromkeys(state.devices, 0)  # what the phase may move if it must
    for d, here in states.items():
        for n in {*here.running, *here.sleeping}:
            spec = inv.services.get(n)
            mb = usage_mb(inv, here, n)
            if n in assign or spec is None or not spec.stoppable:
                hard[d] += mb
            elif n in phase.keep:
                soft[d] += mb
            elif n in here.sleeping:
                soft[d] += mb  # its residual, which stays unless room is needed
            elif can_sleep(inv, here, n):
                soft[d] += min(mb, spec.residual_mb or 0)  # it will sleep
    new = sorted((n for n in phase.services if n not in assign),
                 key=lambda n: (-inv.services[n].priority,
                                -inv.services[n].vram_mb * inv.services[n].gpus, n))
    for name in new:
        spec = inv.services[name]

        def rank(d: int, mb: int = spec.vram_mb) -> tuple[int, int, int]:
            budget = states[d].budget_mb
            room = budget - hard[d] - soft[d] - mb
            tier = 0 if room >= 0 else 1 if budget - hard[d] - mb >= 0 else 2
            fit = room if state.strategy == "best_fit" and tier < 2 else -room
            return (tier, fit, d)

        chosen = tuple(sorted(sorted(allowed(spec, state), key=rank)[:spec.gpus]))
        for d in chosen:
            hard[d] += spec.vram_mb
        assign[name] = chosen
    parts: list[tuple[int, Plan]] = []
    refused: dict[int, Refusal] = {}
    for d in sorted(state.devices):
        here = states[d]
        sub = dataclasses.replace(
            phase, services=tuple(n for n in phase.services if d in assign.get(n, ())),
            keep=tuple(n for n in phase.keep if n in here.running or n in here.sleeping))
        result = core.plan(PlannerInventory(inv.services, {**inv.phases, req.phase: sub}),
                           here, req)
        if isinstance(result, Refusal):
            refused[d] = result
        else:
            parts.append((d, result))
    if refused:
        need = sum(inv.services[n].vram_mb * inv.services[n].gpus for n in phase.services)
        return _refuse(req, core.phase_label(inv, req.phase), need, 1, refused, [],
                       lacking=len(refused))
    return _merge(inv, state, req, parts, states)


def _prewarm(inv: PlannerInventory, state: ObservedState, req: Prewarm) -> Plan | Refusal:
    """What fits beside what runs, moving nothing; each on the card it fits best."""
    if req.phase is not None and req.phase not in inv.phases:
        return core.plan(inv, state, req)
    names = req.services if req.phase is None else inv.phases[req.phase].services
    why = core.prewarm_reason(inv, req)
    states = {d: card(state, d) for d in state.devices}
    free = {d: s.budget_mb - used_mb(inv, s) for d, s in states.items()}
    steps: list[Step] = []
    for name in names:
        spec = inv.services.get(name)
        if spec is None or not spec.stoppable or name in state.running:
            continue
        if name in state.sleeping:
            on = where(state, name)
            if any(d not in free for d in on):
                continue  # asleep on a card not managed: only a stop can touch it
            mb = max(0, spec.vram_mb - usage_mb(inv, states[on[0]], name))
            if all(free[d] >= mb for d in on):
                steps.append(Step("wake", name, mb * len(on), why, devices=on))
                for d in on:
                    free[d] -= mb
            continue
        fits = [d for d in allowed(spec, state) if free[d] >= spec.vram_mb]
        if len(fits) < spec.gpus:
            continue
        order = sorted(fits, key=lambda d: (free[d] if state.strategy == "best_fit"
                                            else -free[d], d))
        on = tuple(sorted(order[:spec.gpus]))
        steps.append(Step("start", name, spec.vram_mb * len(on), why, devices=on))
        for d in on:
            free[d] -= spec.vram_mb
    before = sum(used_mb(inv, s) for s in states.values())
    budget = sum(s.budget_mb for s in states.values())
    return Plan(req, edges(budget - before, steps), budget, before,
                before + sum(s.mb for s in steps))


__all__ = ["allowed", "card", "plan", "where"]
