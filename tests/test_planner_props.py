"""Property tests of the planner over random inventories and states (hypothesis).

Each property is checked against a brute-force oracle over all subsets, so the planner's
shortcuts (priority ceiling, largest-first count, greedy fill) are verified, not assumed.
"""

from __future__ import annotations

from itertools import combinations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_manager.planner import (
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
    used = result.used_before_mb
    done: set[int] = set()
    while len(done) < len(steps):
        ready = sorted(i for i in range(len(steps)) if i not in done
                       and set(steps[i].after) <= done)
        assert ready, "the graph has a cycle"
        # The adversary: every start the graph lets begin begins before any stop ends (the
        # worst case for the budget); which one, and which stop ends next, is drawn.
        starts = [j for j in ready if steps[j].action == "start"]
        i = data.draw(st.sampled_from(starts or ready))
        done.add(i)
        if steps[i].action == "stop":
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
