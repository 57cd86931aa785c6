"""Property tests of the planner over random inventories and states (hypothesis).

Each property is checked against a brute-force oracle over all subsets, so the planner's
shortcuts (priority ceiling, largest-first count, greedy fill) are verified, not assumed.
"""

from __future__ import annotations

import dataclasses
from itertools import combinations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_manager.planner import (
    RELEASES,
    ObservedState,
    PhaseSpec,
    Plan,
    PlannerInventory,
    PreparePhase,
    Refusal,
    ServiceSpec,
    StartService,
    StopAll,
    choose_victims,
    plan,
    usage_mb,
    used_mb,
)

NAMES = [f"s{i}" for i in range(7)]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[PlannerInventory, ObservedState]:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=7, unique=True))
    services = {
        n: ServiceSpec(n, draw(st.integers(0, 12) .map(lambda x: x * 1000)),
                       draw(st.integers(0, 4)), draw(st.booleans()))
        for n in names
    }
    return draw(_state(services, names))


@st.composite
def _state(draw: st.DrawFn, services: dict[str, ServiceSpec],
           names: list[str]) -> tuple[PlannerInventory, ObservedState]:
    phases = {}
    for num in range(draw(st.integers(0, 3))):
        members = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
        keep = draw(st.lists(st.sampled_from([n for n in names if n not in members] or names),
                             max_size=3, unique=True))
        keep = [k for k in keep if k not in members]
        phases[num] = PhaseSpec(num, f"p{num}", tuple(members), tuple(keep))
    running = {}
    for n in draw(st.lists(st.sampled_from(names), unique=True)):
        declared = services[n].vram_mb
        running[n] = draw(st.one_of(st.none(), st.integers(0, declared + 3000)))
    total = draw(st.integers(4000, 32000))
    state = ObservedState(
        total_mb=total, running=running, reserve_mb=draw(st.integers(0, 2000)),
        foreign_mb=draw(st.integers(0, 3000)),
        current_phase=draw(st.one_of(st.none(), st.sampled_from(sorted(phases) or [0]))),
    )
    return PlannerInventory(services, phases), state


@st.composite
def sleepy_scenarios(draw: st.DrawFn) -> tuple[PlannerInventory, ObservedState]:
    """Scenarios where some services can sleep (a residual) and some of those sleep."""
    inv, state = draw(scenarios())
    services = {n: dataclasses.replace(s, residual_mb=draw(st.one_of(
        st.none(), st.integers(0, s.vram_mb // 2 // 100).map(lambda x: x * 100))))
        for n, s in inv.services.items()}
    sleepers = [n for n in state.running if services[n].residual_mb is not None]
    asleep = draw(st.lists(st.sampled_from(sleepers), unique=True)) if sleepers else []
    running = {n: mb for n, mb in state.running.items() if n not in asleep}
    sleeping = {n: draw(st.one_of(st.none(), st.integers(0, services[n].residual_mb or 0)))
                for n in asleep}
    unready = frozenset(draw(st.lists(st.sampled_from(sorted(running)), unique=True,
                                      max_size=1))) if running else frozenset()
    return PlannerInventory(services, inv.phases), dataclasses.replace(
        state, running=running, sleeping=sleeping, unready=unready)


def simulate(inv: PlannerInventory, state: ObservedState, result: Plan) -> set[str]:
    """Apply the steps; assert the budget holds after every start and steps are sane."""
    running = dict(state.running)
    used = used_mb(inv, state)
    seen: set[str] = set()
    for step in result.steps:
        assert step.service not in seen, f"{step.service} appears twice"
        seen.add(step.service)
        if step.action == "stop":
            assert step.service in running
            assert step.mb == usage_mb(inv, state, step.service)
            used -= step.mb
            del running[step.service]
        else:
            assert step.service not in running
            used += inv.services[step.service].vram_mb
            running[step.service] = None
            assert used <= state.budget_mb, f"over budget after starting {step.service}"
    assert used == result.used_after_mb
    return set(running)


def oracle_victims(cands: list[tuple[str, int, int]], shortfall: int) -> tuple[int, int] | None:
    """Best (priority ceiling, count) over all subsets that free enough; None if none does."""
    best: tuple[int, int] | None = None
    for k in range(len(cands) + 1):
        for combo in combinations(cands, k):
            if sum(c[1] for c in combo) >= shortfall:
                key = (max((c[2] for c in combo), default=-1), k)
                best = key if best is None or key < best else best
    return best


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios(), st.sampled_from(NAMES))
def test_start_properties(scenario: tuple[PlannerInventory, ObservedState], name: str) -> None:
    inv, state = scenario
    if name not in inv.services:
        assert isinstance(plan(inv, state, StartService(name)), Refusal)
        return
    spec = inv.services[name]
    result = plan(inv, state, StartService(name))
    cands = [(n, usage_mb(inv, state, n), inv.services[n].priority) for n in state.running
             if n in inv.services and inv.services[n].preemptible
             and inv.services[n].priority < spec.priority]
    shortfall = spec.vram_mb - (state.budget_mb - used_mb(inv, state))
    if name in state.running:
        assert isinstance(result, Plan) and result.steps == ()
        return
    best = oracle_victims(cands, shortfall) if shortfall > 0 else (-1, 0)
    if isinstance(result, Refusal):
        # a refusal only when no allowed plan exists, and it says by how much
        assert best is None
        assert result.code == "insufficient_vram"
        assert result.short_mb == shortfall - sum(c[1] for c in cands) > 0
        return
    assert best is not None
    final = simulate(inv, state, result)
    assert name in final
    victims = [s for s in result.steps if s.action == "stop"]
    for v in victims:
        vs = inv.services[v.service]
        # never preempts a higher/equal priority or a non-preemptible service
        assert vs.preemptible and vs.priority < spec.priority
    # minimal: the lowest possible priority ceiling, then the fewest stops
    ceiling = max((inv.services[v.service].priority for v in victims), default=-1)
    assert (ceiling, len(victims)) == best


@SETTINGS
@given(scenarios(), st.integers(0, 3))
def test_phase_properties(scenario: tuple[PlannerInventory, ObservedState], num: int) -> None:
    inv, state = scenario
    result = plan(inv, state, PreparePhase(num))
    if num not in inv.phases:
        assert isinstance(result, Refusal) and result.code == "unknown_phase"
        return
    phase = inv.phases[num]
    wanted, keep = set(phase.services), set(phase.keep)
    unlisted = {n for n in state.running if n not in wanted | keep}
    kept = [n for n in state.running if n in keep]
    cands = [(n, usage_mb(inv, state, n), inv.services[n].priority) for n in kept
             if inv.services[n].preemptible]
    used_after_unlisted = used_mb(inv, state) - sum(usage_mb(inv, state, n) for n in unlisted)
    need = sum(inv.services[n].vram_mb for n in wanted if n not in state.running)
    shortfall = need - (state.budget_mb - used_after_unlisted)
    best = oracle_victims(cands, shortfall) if shortfall > 0 else (-1, 0)
    if isinstance(result, Refusal):
        assert best is None and result.code == "insufficient_vram" and result.short_mb > 0
        return
    assert best is not None
    final = simulate(inv, state, result)
    # every listed service runs; nothing unlisted and unkept survives
    assert wanted <= final
    assert not (final & unlisted)
    kept_stops = [s for s in result.steps if s.action == "stop" and s.service in keep]
    for s in kept_stops:
        assert inv.services[s.service].preemptible
    ceiling = max((inv.services[s.service].priority for s in kept_stops), default=-1)
    assert (ceiling, len(kept_stops)) == best
    # stops precede starts
    actions = [s.action for s in result.steps]
    assert actions == sorted(actions, key=lambda a: a != "stop")


@SETTINGS
@given(scenarios())
def test_stop_all_empties_and_is_deterministic(
    scenario: tuple[PlannerInventory, ObservedState],
) -> None:
    inv, state = scenario
    result = plan(inv, state, StopAll())
    assert isinstance(result, Plan)
    assert simulate(inv, state, result) == set()
    prios = [inv.services[s.service].priority for s in result.steps]
    assert prios == sorted(prios)
    assert plan(inv, state, StopAll()) == result


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9000), st.integers(0, 3)), max_size=8),
       st.integers(-100, 40000))
def test_choose_victims_matches_oracle(items: list[tuple[int, int]], shortfall: int) -> None:
    cands = [(f"c{i}", mb, prio) for i, (mb, prio) in enumerate(items)]
    chosen = choose_victims(cands, shortfall)
    best = oracle_victims(cands, shortfall) if shortfall > 0 else (-1, 0)
    if chosen is None:
        assert best is None
        return
    assert best is not None
    picked = [c for c in cands if c[0] in chosen]
    assert len(picked) == len(chosen)
    assert sum(c[1] for c in picked) >= shortfall
    assert (max((c[2] for c in picked), default=-1), len(picked)) == best


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_any_order_the_graph_allows_stays_within_budget(
        scn: tuple[PlannerInventory, ObservedState], data: st.DataObject) -> None:
    """The plan is a graph: stops run side by side, a start waits only for the stops it
    names. Run the steps in any order the graph allows (a start allocates when it begins,
    a stop frees when it ends): the budget holds after every start."""
    inv, state = scn
    requests = [StartService(n) for n in inv.services] + [PreparePhase(n) for n in inv.phases]
    result = plan(inv, state, data.draw(st.sampled_from([*requests, StopAll()])))
    if not isinstance(result, Plan):
        return
    steps = result.steps
    for i, step in enumerate(steps):
        assert all(steps[d].action == "stop" and d != i for d in step.after), step
        if step.action == "stop":
            assert step.after == ()  # stops never wait: they run side by side
    adversary_order(result, data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(sleepy_scenarios(), st.data())
def test_with_sleepers_any_order_stays_within_budget_and_ends_as_asked(
        scn: tuple[PlannerInventory, ObservedState], data: st.DataObject) -> None:
    """With services that can sleep (and some asleep): the same graph property, and the end
    state is the one asked for: a phase's services awake, the unlisted ones asleep or
    stopped; a sleep only where there is a sleep: block, and a stop of a service that could
    have slept only when the sleepers' residuals did not fit."""
    inv, state = scn
    requests = [StartService(n) for n in inv.services] + [PreparePhase(n) for n in inv.phases]
    request = data.draw(st.sampled_from([*requests, StopAll()]))
    result = plan(inv, state, request)
    if not isinstance(result, Plan):
        assert result.code in ("insufficient_vram", "unknown_service")
        return
    adversary_order(result, data)
    awake, asleep = set(state.running), set(state.sleeping) - set(state.running)
    for step in result.steps:
        if step.action == "sleep":
            assert inv.services[step.service].residual_mb is not None
            assert step.service in awake and step.service not in state.unready
            awake.discard(step.service)
            asleep.add(step.service)
        elif step.action == "stop":
            awake.discard(step.service)
            asleep.discard(step.service)
        else:
            assert (step.action == "wake") == (step.service in asleep), step
            asleep.discard(step.service)
            awake.add(step.service)
    if isinstance(request, PreparePhase):
        phase = inv.phases[request.phase]
        assert set(phase.services) <= awake
        assert not (awake - set(phase.services) - set(phase.keep))
        # sleepers stopped (running ones that could sleep, or ones already asleep): only
        # when what they would have kept asleep did not fit
        kept = 0
        for stop in result.steps:
            name = stop.service
            if stop.action != "stop" or name in phase.keep or name in phase.services:
                continue
            if name in state.running and inv.services[name].residual_mb is not None \
                    and name not in state.unready:
                kept += inv.services[name].residual_mb or 0
            elif name in state.sleeping and name not in state.running:
                kept += stop.mb
        if kept:
            assert result.used_after_mb + kept > result.budget_mb
    if isinstance(request, StartService):
        assert request.name in awake


def adversary_order(result: Plan, data: st.DataObject) -> None:
    """Run the steps in an order the graph allows, drawn by an adversary: every start or wake
    the graph lets begin begins before any release ends (a start allocates when it begins,
    a release frees when it ends); the budget must hold after each."""
    steps = result.steps
    for i, step in enumerate(steps):
        assert all(steps[d].action in RELEASES and d != i for d in step.after), step
        if step.action in RELEASES:
            assert step.after == ()  # releases never wait: they run side by side
    used = result.used_before_mb
    done: set[int] = set()
    while len(done) < len(steps):
        ready = sorted(i for i in range(len(steps)) if i not in done
                       and set(steps[i].after) <= done)
        assert ready, "the graph has a cycle"
        starts = [j for j in ready if steps[j].action not in RELEASES]
        i = data.draw(st.sampled_from(starts or ready))
        done.add(i)
        if steps[i].action in RELEASES:
            used -= steps[i].mb
        else:
            used += steps[i].mb
            # (a 0 MB start adds nothing: it may begin while foreign growth is still being
            # paid back by the stops)
            assert used <= result.budget_mb or steps[i].mb == 0, \
                f"over budget when {steps[i].service} began"
    assert used == result.used_after_mb


def test_a_start_that_fits_beside_what_runs_waits_for_nothing() -> None:
    inv = PlannerInventory(
        {"vidi": ServiceSpec("vidi", 4000, 40), "cosy": ServiceSpec("cosy", 4000, 50),
         "comfy": ServiceSpec("comfy", 20000, 100)},
        {2: PhaseSpec(2, "", ("vidi",)), 3: PhaseSpec(3, "", ("cosy",)),
         5: PhaseSpec(5, "", ("vidi", "cosy"))})
    state = ObservedState(24576, {"vidi": None}, 1024, 0, 2)
    p3 = plan(inv, state, PreparePhase(3))
    assert isinstance(p3, Plan)
    assert [(s.action, s.service, s.after) for s in p3.steps] == [
        ("stop", "vidi", ()), ("start", "cosy", ())]  # cosy fits beside vidi
    p5 = plan(inv, ObservedState(24576, {}, 1024), PreparePhase(5))
    assert isinstance(p5, Plan) and all(s.after == () for s in p5.steps)  # side by side
    ac3 = plan(inv, ObservedState(24576, {"cosy": None}, 1024), StartService("comfy"))
    assert isinstance(ac3, Plan)
    assert [(s.action, s.service, s.after) for s in ac3.steps] == [
        ("stop", "cosy", ()), ("start", "comfy", (0,))]  # needs cosy's VRAM


def test_a_start_waits_for_the_stops_that_repay_a_deficit() -> None:
    # 4000 MB in use on a 3000 MB budget (foreign memory grew): x's stop repays the
    # deficit, y's frees the room b needs; b must wait for both, or it begins at 4000 MB.
    inv = PlannerInventory(
        {"x": ServiceSpec("x", 1000, 0), "y": ServiceSpec("y", 3000, 1),
         "b": ServiceSpec("b", 3000, 5)},
        {1: PhaseSpec(1, "", ("b",))})
    state = ObservedState(4000, {"x": None, "y": None}, 0, 1000)
    result = plan(inv, state, PreparePhase(1))
    assert isinstance(result, Plan)
    assert [(s.action, s.service, s.after) for s in result.steps] == [
        ("stop", "x", ()), ("stop", "y", ()), ("start", "b", (0, 1))]


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9000), st.integers(0, 3),
                          st.one_of(st.none(), st.floats(0.01, 300))), max_size=8),
       st.integers(-100, 40000))
def test_learned_costs_only_break_ties_among_equals(
        items: list[tuple[int, int, float | None]], shortfall: int) -> None:
    """With costs as input the choice stays minimal (the lowest priority ceiling, then the
    fewest victims); among the candidates of one priority below the ceiling that were passed
    over, none both frees as much and comes back faster than one that was taken."""
    cands = [(f"c{i}", mb, prio) for i, (mb, prio, _) in enumerate(items)]
    back = {f"c{i}": t for i, (_, _, t) in enumerate(items) if t is not None}
    chosen = choose_victims(cands, shortfall, back)
    best = oracle_victims(cands, shortfall) if shortfall > 0 else (-1, 0)
    if chosen is None:
        assert best is None
        return
    assert best is not None
    picked = [c for c in cands if c[0] in chosen]
    assert sum(c[1] for c in picked) >= shortfall
    assert (max((c[2] for c in picked), default=-1), len(picked)) == best
    inf = float("inf")
    for name, mb, prio in picked:
        for other, omb, oprio in cands:
            if other in chosen or oprio != prio or omb < mb:
                continue
            # a passed-over equal that frees at least as much is not cheaper to bring back
            assert back.get(other, inf) >= back.get(name, inf), (name, other)
