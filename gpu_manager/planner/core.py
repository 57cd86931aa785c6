"""The preemption planner: `plan(inventory, state, request) -> Plan | Refusal`.

Pure: no I/O, no logging, no clock, so it can be property-tested and called on every request.

Rules
- A running service occupies max(declared, measured) MB; a sleeping one its measured residual
  (the declared one until measured); budget = total - reserve - foreign.
- Releases (stops, sleeps) come before the starts and wakes that need their VRAM (`Step.after`
  says which), so every order the graph allows stays within the budget.
- Where VRAM must be freed, a service with `sleep:` is put to sleep rather than stopped, as long
  as what the sleepers keep still fits; when it does not, sleepers are stopped (lowest priority
  first) before anything else is touched. Starting a sleeping service wakes it.
- A start preempts only running (or sleeping), preemptible services of strictly lower priority.
  A start a request caused (`RequestStart`) may also swap out a service of its own priority
  that has no request in flight or waiting (`ObservedState.in_use`): models of one rank take
  turns on the GPU, and one busy answering is never cut for an equal.
  Victims are chosen to (1) keep the highest preempted priority as low as possible, then (2)
  stop as few services as possible, then (3) prefer lower priority and smaller services among
  equal choices.
- A phase releases every running service it neither lists nor keeps (sleepers sleep, the rest
  stop; services already asleep stay asleep), starts or wakes what it lists (all at once), and
  keeps `keep:` services only while they fit; when they do not, the kept ones are released by
  the same victim rule (a non-preemptible kept service is never touched).
- Releases run lowest priority first, so an interrupted plan leaves the most important running.
- Prewarm starts or wakes the services of a phase that fit beside what runs, moving nothing.
"""

from __future__ import annotations

from collections import Counter

from gpu_manager.planner.common import (
    FOREIGN,
    acquire,
    can_sleep,
    candidates,
    choose_victims,
    finish,
    host_ram,
    insufficient,
    release,
    stop_order,
    unknown_service,
    usage_mb,
    used_mb,
)
from gpu_manager.planner.model import (
    Blocker,
    ObservedState,
    Plan,
    PlannerInventory,
    PreparePhase,
    Prewarm,
    Refusal,
    Request,
    RequestStart,
    ServiceSpec,
    SleepService,
    StartService,
    Step,
    StopAll,
    StopService,
)

__all__ = ["AGAIN", "FOREIGN", "can_sleep", "choose_victims", "host_ram", "plan", "usage_mb",
           "used_mb"]

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
        case SleepService():
            return _plan_sleep(inv, state, request)
        case Prewarm():
            return _plan_prewarm(inv, state, request)
        case StopAll():
            asleep = sorted(set(state.sleeping) - set(state.running))
            victims = [n for n in (*state.running, *asleep)
                       if n in inv.services and inv.services[n].stoppable]
            steps = [release(inv, state, n, "release all")
                     for n in stop_order(inv, state, victims)]
            return finish(inv, state, request, steps)


def prewarm_reason(inv: PlannerInventory, req: Prewarm) -> str:
    """Why a prewarm starts what it starts (a known phase, or wake_when_free)."""
    if req.phase is None:
        return "it fits again (wake_when_free)"
    return f"prewarm for {phase_label(inv, req.phase)}"


def phase_label(inv: PlannerInventory, number: int) -> str:
    phase = inv.phases[number]
    return f"phase {number}" + (f" ({phase.name})" if phase.name else "")


def _plan_start(inv: PlannerInventory, state: ObservedState, req: StartService) -> Plan | Refusal:
    spec = inv.services.get(req.name)
    if spec is None:
        return unknown_service(inv, req, req.name)
    if req.name in state.running and req.name not in state.unready:
        return finish(inv, state, req, [])
    again: list[Step] = []
    if req.name in state.running:  # failed, with a process left: stop it, start it again
        again = [release(inv, state, req.name, AGAIN)]
        start = Step("start", req.name, spec.vram_mb, "requested")
    else:
        start = acquire(inv, state, req.name, "requested")
    freed = sum(s.mb for s in again)
    shortfall = start.mb - (state.budget_mb - used_mb(inv, state) + freed)
    others = [n for n in (*state.running, *state.sleeping) if n != req.name]
    swap = isinstance(req, RequestStart)
    victims, sleep, deep, cands, blockers = _victims(inv, state, others, spec.priority,
                                                     shortfall, swap)
    if victims is None:
        short = shortfall - sum(mb for _, mb, _ in cands)
        return insufficient(state, req, req.name, start.mb, short, blockers)
    # the learned cost is what chose among equals: said where there were equals to choose from
    ties = {p for p, k in Counter(c[2] for c in cands).items() if k > 1}
    steps = [release(inv, state, v, _preempted(
                 req.name, inv.services[v], spec.priority,
                 sleep and can_sleep(inv, state, v), inv.services[v].priority in ties),
                 preemption=True, sleep=sleep, deep=deep)
             for v in stop_order(inv, state, victims)]
    return finish(inv, state, req, [*again, *steps, start])


def _preempted(by: str, victim: ServiceSpec, ours: int, asleep: bool, tied: bool) -> str:
    """Why a victim goes, and (learned, when it had equals to be chosen from) how long it
    takes to come back: what made it the victim among them."""
    back = victim.back_in(asleep) if tied else None
    how = "wake" if asleep and victim.wake_s else "start"
    cost = "" if back is None else f"; back in ~{back:.1f}s by {how}"
    theirs = victim.priority
    if theirs == ours:  # a request's swap: an equal with no request in flight
        return f"swapped out for {by} (priority {theirs} = {ours}, no request in flight{cost})"
    return f"preempted by {by} (priority {theirs} < {ours}{cost})"


def _victims(inv: PlannerInventory, state: ObservedState, names: list[str], below: int | None,
             shortfall: int, swap: bool = False) -> tuple[
                 list[str] | None, bool, bool, list[tuple[str, int, int]], list[Blocker]]:
    """Victims for `shortfall`: first by sleeping what can sleep, and if what the sleepers
    keep is too much, by stopping. (victims or None, whether they sleep, the candidates and
    blockers of the last try)."""
    # the ladder, rung by rung: every victim by its sleep, then those that have one by
    # their checkpoint (residual 0), then every victim stopped
    for sleep, deep in ((True, False), (True, True), (False, False)):
        if deep and not any(inv.services[n].deep for n in names if n in inv.services):
            continue
        cands, blockers = candidates(inv, state, names, below=below, sleep=sleep, swap=swap,
                                     deep=deep)
        back_in = {n: t for n, _, _ in cands if (spec := inv.services.get(n)) is not None
                   and (t := spec.back_in(sleep and can_sleep(inv, state, n))) is not None}
        victims = choose_victims(cands, shortfall, back_in)
        if victims is not None:
            return victims, sleep, deep, cands, blockers
    return None, False, False, cands, blockers


def _plan_stop(inv: PlannerInventory, state: ObservedState, req: StopService) -> Plan | Refusal:
    if req.name not in inv.services or not inv.services[req.name].stoppable:
        return unknown_service(inv, req, req.name)
    if req.name not in state.running and req.name not in state.sleeping:
        return finish(inv, state, req, [])
    refusal = _needed(inv, state, req, req.name, req.force, "stop it")
    return refusal or finish(inv, state, req, [release(inv, state, req.name, "requested")])


def _needed(inv: PlannerInventory, state: ObservedState, req: Request, name: str, force: bool,
            verb: str) -> Refusal | None:
    if state.current_phase is None or state.current_phase not in inv.phases or force:
        return None
    if name not in inv.phases[state.current_phase].services:
        return None
    label = phase_label(inv, state.current_phase)
    return Refusal(req, "needed_by_phase",
                   f"{name} is needed by the current {label}; pass force=true to {verb}")


def _plan_sleep(inv: PlannerInventory, state: ObservedState, req: SleepService) -> Plan | Refusal:
    spec = inv.services.get(req.name)
    if spec is None or not spec.stoppable:
        return unknown_service(inv, req, req.name)
    if spec.residual_mb is None:
        return Refusal(req, "cannot_sleep", f"{req.name} has no sleep: block in services.yaml; "
                       "it can only be stopped")
    if req.name in state.sleeping and req.name not in state.running:
        return finish(inv, state, req, [])
    if req.name not in state.running:
        return Refusal(req, "not_running", f"{req.name} is not running: nothing to put to sleep")
    if not can_sleep(inv, state, req.name):
        return Refusal(req, "cannot_sleep", f"{req.name} is not serving (failed): stop it")
    refusal = _needed(inv, state, req, req.name, req.force, "put it to sleep")
    return refusal or finish(inv, state, req,
                             [release(inv, state, req.name, "requested", sleep=True)])


def _plan_phase(inv: PlannerInventory, state: ObservedState, req: PreparePhase) -> Plan | Refusal:
    phase = inv.phases.get(req.phase)
    if phase is None:
        known = ", ".join(str(n) for n in sorted(inv.phases)) or "(none)"
        return Refusal(req, "unknown_phase", f"unknown phase {req.phase} (known: {known})")
    for name in (*phase.services, *phase.keep):
        if name not in inv.services:
            return unknown_service(inv, req, name)
    label = phase_label(inv, req.phase)
    wanted, keep = set(phase.services), set(phase.keep)
    managed = [n for n in state.running if n in inv.services and inv.services[n].stoppable]
    unlisted = [n for n in managed if n not in wanted and n not in keep]
    steps = [release(inv, state, n, f"not in {label}", sleep=True)
             for n in stop_order(inv, state, unlisted)]
    again = [n for n in phase.services if n in state.running and n in state.unready]
    steps += [release(inv, state, n, AGAIN) for n in again]
    acquires = [acquire(inv, state, n, f"needed by {label}") for n in phase.services
                if n not in state.running or n in again]
    need = sum(s.mb for s in acquires)
    used = used_mb(inv, state) - sum(s.mb for s in steps)
    shortfall = need - (state.budget_mb - used)
    slept = {st.service: st for st in steps}
    stopped: list[str] = []  # sleepers `_wake_less` stopped
    if shortfall > 0:  # what the sleepers keep is in the way: stop them instead
        steps, shortfall, stopped = _wake_less(inv, state, steps, wanted, keep, shortfall)
    touched = {s.service for s in steps}
    kept = [n for n in (*managed, *state.sleeping) if n in keep and n not in touched]
    victims, sleep, deep, cands, blockers = _victims(inv, state, kept, None, shortfall)
    if victims is None:
        short = shortfall - sum(mb for _, mb, _ in cands)
        blockers += [Blocker(n, usage_mb(inv, state, n), f"needed by {label}")
                     for n in state.running if n in wanted]
        blockers += [Blocker(n, usage_mb(inv, state, n), "not in the inventory")
                     for n in state.running if n not in inv.services]
        blockers += [Blocker(n, usage_mb(inv, state, n), "held by a client")
                     for n in state.running
                     if n in inv.services and not inv.services[n].stoppable]
        what = f"{label}: " + ", ".join(s.service for s in acquires) if acquires else label
        return insufficient(state, req, what, need, short, blockers)
    steps += [release(inv, state, v, f"kept by {label} but does not fit beside it",
                      preemption=True, sleep=sleep, deep=deep)
              for v in stop_order(inv, state, victims)]
    if victims and stopped:  # what the kept ones free may leave room for residuals after all
        steps = _sleep_again(inv, state, slept, stopped, steps, need)
    return finish(inv, state, req, [*steps, *acquires])


def _sleep_again(inv: PlannerInventory, state: ObservedState, slept: dict[str, Step],
                 stopped: list[str], steps: list[Step], need: int) -> list[Step]:
    """Undo the stops `_wake_less` made (`stopped`: a sleep turned into a stop, a sleeper
    stopped) whose residual fits beside the phase once the kept services are released too,
    highest priority first: a sleeper stays asleep whenever its residual fits."""
    free = state.budget_mb - (used_mb(inv, state) - sum(s.mb for s in steps) + need)
    out: list[Step | None] = list(steps)
    for name in reversed(stopped):  # stopped lowest priority first: undo from the highest
        i = next(i for i, st in enumerate(steps) if st.service == name)
        before = slept.get(name)  # its sleep, or None: it was asleep and stays so
        residual = steps[i].mb - (before.mb if before is not None else 0)
        if residual <= free:
            out[i] = before
            free -= residual
    return [st for st in out if st is not None]


def _wake_less(inv: PlannerInventory, state: ObservedState, steps: list[Step],
               wanted: set[str], keep: set[str],
               shortfall: int) -> tuple[list[Step], int, list[str]]:
    """Turn sleeps into stops, and stop services asleep that the phase does not want, lowest
    priority first, until their residuals cover `shortfall` (or there are none left); also
    says which it stopped, in that order."""
    asleep = [n for n in state.sleeping if n not in state.running and n in inv.services
              and inv.services[n].stoppable and n not in wanted and n not in keep]
    sleeps = [s.service for s in steps if s.action == "sleep"]
    order = stop_order(inv, state, [*sleeps, *asleep])
    out = list(steps)
    stopped: list[str] = []
    for name in order:
        if shortfall <= 0:
            break
        stopped.append(name)
        if name in sleeps:
            i = next(i for i, s in enumerate(out) if s.service == name)
            stop = release(inv, state, name, f"{out[i].reason}; its residual does not fit")
            shortfall -= stop.mb - out[i].mb
            out[i] = stop
        else:
            stop = release(inv, state, name, "asleep, but its residual does not fit")
            shortfall -= stop.mb
            out.append(stop)
    return out, shortfall, stopped


def _plan_prewarm(inv: PlannerInventory, state: ObservedState, req: Prewarm) -> Plan | Refusal:
    if req.phase is None:
        names, why = req.services, prewarm_reason(inv, req)
    elif req.phase in inv.phases:
        names, why = inv.phases[req.phase].services, prewarm_reason(inv, req)
    else:
        known = ", ".join(str(n) for n in sorted(inv.phases)) or "(none)"
        return Refusal(req, "unknown_phase", f"unknown phase {req.phase} (known: {known})")
    free = state.budget_mb - used_mb(inv, state)
    steps: list[Step] = []
    for name in names:
        if name not in inv.services or not inv.services[name].stoppable \
                or name in state.running:
            continue
        step = acquire(inv, state, name, why)
        if step.mb <= free:
            steps.append(step)
            free -= step.mb
    return finish(inv, state, req, steps)

