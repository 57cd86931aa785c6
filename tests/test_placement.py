"""The planner on several GPUs: placement, preemption on one card, pins, multi-card services
(table tests), and properties over random multi-card states (hypothesis): no card is ever
planned over its budget, pinned and running services are never moved, a `gpus: k` service
gets k distinct allowed cards."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_manager.planner import (
    RELEASES,
    DeviceBudget,
    ObservedState,
    PhaseSpec,
    Plan,
    PlannerInventory,
    PreparePhase,
    Prewarm,
    Refusal,
    ServiceSpec,
    StartService,
    StopService,
    plan,
    usage_mb,
)
from gpu_manager.planner.place import card

GB = 1024


def two_cards(**placement: tuple[int, ...]) -> dict[str, object]:
    return {"devices": {0: DeviceBudget(24 * GB), 1: DeviceBudget(24 * GB)},
            "placement": placement}


def state(running: dict[str, int | None], sleeping: dict[str, int | None] | None = None,
          devices: dict[int, DeviceBudget] | None = None, strategy: str = "best_fit",
          **placement: tuple[int, ...]) -> ObservedState:
    cards = devices or {0: DeviceBudget(24 * GB), 1: DeviceBudget(24 * GB)}
    return ObservedState(sum(c.total_mb for c in cards.values()), running,
                         sum(c.reserve_mb for c in cards.values()),
                         sum(c.foreign_mb for c in cards.values()), None, sleeping or {},
                         devices=cards, placement=placement,
                         strategy=strategy)  # type: ignore[arg-type]


def inv(*specs: ServiceSpec, phases: dict[int, PhaseSpec] | None = None) -> PlannerInventory:
    return PlannerInventory({s.name: s for s in specs}, phases or {})


def ok(result: Plan | Refusal) -> Plan:
    assert isinstance(result, Plan), result
    return result


def test_two_large_services_go_to_two_cards_without_preemption() -> None:
    i = inv(ServiceSpec("a", 20 * GB, 1), ServiceSpec("b", 20 * GB, 1))
    first = ok(plan(i, state({}), StartService("a")))
    assert [(s.action, s.service, s.devices) for s in first.steps] == [("start", "a", (0,))]
    second = ok(plan(i, state({"a": None}, a=(0,)), StartService("b")))
    assert [(s.action, s.service, s.devices) for s in second.steps] == [("start", "b", (1,))]


def test_a_third_preempts_only_on_the_card_where_that_is_cheapest() -> None:
    i = inv(ServiceSpec("a", 20 * GB, 5), ServiceSpec("b", 20 * GB, 1),
            ServiceSpec("c", 20 * GB, 3))
    for a_on, b_on in ((0, 1), (1, 0)):
        placed = {"a": (a_on,), "b": (b_on,)}
        p = ok(plan(i, state({"a": None, "b": None}, **placed), StartService("c")))
        assert [(s.action, s.service, s.devices) for s in p.steps] == [
            ("stop", "b", (b_on,)), ("start", "c", (b_on,))]
        assert p.steps[1].after == (0,) and p.steps[0].preemption


def test_best_fit_and_spread() -> None:
    i = inv(ServiceSpec("a", 10 * GB), ServiceSpec("s", 4 * GB))
    busy = {"a": None}
    assert ok(plan(i, state(busy, a=(1,)), StartService("s"))).steps[0].devices == (1,)
    spread = state(busy, strategy="spread", a=(1,))
    assert ok(plan(i, spread, StartService("s"))).steps[0].devices == (0,)


def test_a_pinned_service_stays_on_its_card_or_is_refused_naming_it() -> None:
    i = inv(ServiceSpec("big", 20 * GB, 9, preemptible=False),
            ServiceSpec("pin", 8 * GB, 1, devices=(0,)))
    refused = plan(i, state({"big": None}, big=(0,)), StartService("pin"))
    assert isinstance(refused, Refusal) and refused.code == "insufficient_vram"
    assert "GPU 0" in refused.message and "GPU 1" not in refused.message
    assert [(b.name, b.device) for b in refused.blockers] == [("big", 0)]
    assert refused.short_mb == 4 * GB
    assert ok(plan(i, state({"big": None}, big=(1,)), StartService("pin"))).steps[0].devices \
        == (0,)


def test_a_two_card_service_gets_two_cards_or_a_refusal_that_says_why() -> None:
    i = inv(ServiceSpec("tp", 16 * GB, 5, gpus=2), ServiceSpec("x", 12 * GB, 9))
    p = ok(plan(i, state({}), StartService("tp")))
    assert [(s.action, s.devices, s.mb) for s in p.steps] == [("start", (0, 1), 32 * GB)]
    refused = plan(i, state({"x": None}, x=(1,)), StartService("tp"))
    assert isinstance(refused, Refusal)
    assert "needs 2 cards" in refused.message and "GPU 1" in refused.message
    assert {b.device for b in refused.blockers} == {1}
    # stopping a two-card service frees both cards
    stop = ok(plan(i, state({"tp": None}, tp=(0, 1)), StopService("tp")))
    assert stop.steps[0].devices == (0, 1)


def test_a_sleeper_wakes_where_its_residual_is() -> None:
    i = inv(ServiceSpec("s", 8 * GB, residual_mb=GB), ServiceSpec("a", 10 * GB))
    st8 = state({"a": None}, {"s": GB}, a=(0,), s=(0,))
    p = ok(plan(i, st8, StartService("s")))
    assert [(s.action, s.devices, s.mb) for s in p.steps] == [("wake", (0,), 7 * GB)]


def test_a_phase_places_its_services_across_cards_and_releases_per_card() -> None:
    i = inv(ServiceSpec("a", 14 * GB), ServiceSpec("b", 14 * GB), ServiceSpec("old", 20 * GB),
            ServiceSpec("k", 6 * GB),
            phases={1: PhaseSpec(1, "two", ("a", "b"), ("k",))})
    p = ok(plan(i, state({"old": None, "k": None}, old=(0,), k=(1,)), PreparePhase(1)))
    got = {(s.action, s.service): s.devices for s in p.steps}
    assert got[("stop", "old")] == (0,)
    assert {got[("start", "a")], got[("start", "b")]} == {(0,), (1,)}
    assert ("stop", "k") not in got  # kept: 14 + 6 fit on a card
    start_on_0 = next(j for j, s in enumerate(p.steps) if s.devices == (0,) and s.action ==
                      "start")
    assert p.steps[start_on_0].after == (0,)  # waits for old's stop on its card only
    start_on_1 = next(j for j, s in enumerate(p.steps) if s.devices == (1,) and s.action ==
                      "start")
    assert p.steps[start_on_1].after == ()


def test_prewarm_moves_nothing_and_uses_the_room_of_every_card() -> None:
    i = inv(ServiceSpec("a", 20 * GB), ServiceSpec("b", 20 * GB), ServiceSpec("c", 20 * GB),
            phases={2: PhaseSpec(2, "", ("b", "c"))})
    p = ok(plan(i, state({"a": None}, a=(0,)), Prewarm(2)))
    assert [(s.action, s.service, s.devices) for s in p.steps] == [("start", "b", (1,))]


# ---- properties ---------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[PlannerInventory, ObservedState]:
    ncards = draw(st.integers(2, 4))
    cards = {d: DeviceBudget(draw(st.integers(8, 24)) * GB, draw(st.sampled_from([0, GB])),
                             draw(st.sampled_from([0, 0, 2 * GB])))
             for d in range(ncards)}
    names = [f"s{i}" for i in range(draw(st.integers(1, 7)))]
    services = {}
    for n in names:
        gpus = draw(st.sampled_from([1, 1, 1, 2]))
        pin = draw(st.one_of(st.none(), st.lists(st.integers(0, ncards - 1), min_size=gpus,
                                                 max_size=ncards, unique=True)))
        services[n] = ServiceSpec(n, draw(st.integers(0, 12)) * GB, draw(st.integers(0, 4)),
                                  draw(st.booleans()), devices=tuple(pin) if pin else None,
                                  gpus=gpus,
                                  residual_mb=draw(st.sampled_from([None, GB])))
    used = dict.fromkeys(cards, 0)
    running: dict[str, int | None] = {}
    sleeping: dict[str, int | None] = {}
    placement: dict[str, tuple[int, ...]] = {}
    for n in draw(st.lists(st.sampled_from(names), unique=True)):
        spec = services[n]
        allowed = list(spec.devices or cards)
        on = tuple(sorted(draw(st.permutations(allowed))[:spec.gpus]))
        if all(used[d] + spec.vram_mb <= cards[d].budget_mb for d in on):
            for d in on:
                used[d] += spec.vram_mb
            placement[n] = on
            if spec.residual_mb is not None and draw(st.booleans()):
                sleeping[n] = None  # asleep: only its residual counts
            else:
                running[n] = None
    phases = {1: PhaseSpec(1, "p", tuple(draw(st.lists(st.sampled_from(names), max_size=3,
                                                        unique=True))))}
    observed = ObservedState(sum(c.total_mb for c in cards.values()), running,
                             sum(c.reserve_mb for c in cards.values()),
                             sum(c.foreign_mb for c in cards.values()), None, sleeping,
                             devices=cards, placement=placement,
                             strategy=draw(st.sampled_from(["best_fit", "spread"])))
    return PlannerInventory(services, phases), observed


def per_card_after(i: PlannerInventory, s: ObservedState, p: Plan) -> dict[int, int]:
    use = {d: sum(usage_mb(i, card(s, d), n) for n in (*card(s, d).running,
                                                        *card(s, d).sleeping))
           for d in s.devices}
    for step in p.steps:
        share = step.mb // len(step.devices)
        for d in step.devices:
            use[d] += -share if step.action in RELEASES else share
    return use


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_plans_keep_every_card_within_budget_and_move_nothing(
        scenario: tuple[PlannerInventory, ObservedState], data: st.DataObject) -> None:
    i, s = scenario
    request = data.draw(st.one_of(st.sampled_from([StartService(n) for n in i.services]),
                                  st.just(PreparePhase(1)), st.just(Prewarm(1))))
    result = plan(i, s, request)
    if isinstance(result, Refusal):
        assert result.message
        assert all(b.device in s.devices for b in result.blockers
                   if b.name != "(foreign)")
        return
    after = per_card_after(i, s, result)
    for d, mb in after.items():
        assert mb <= s.devices[d].budget_mb, (d, mb, result.steps)
    released = [s.service for s in result.steps if s.action in RELEASES]
    assert len(released) == len(set(released)), "a service released twice"
    for step in result.steps:
        spec = i.services[step.service]
        assert step.devices, step
        if step.action in ("start", "wake") and step.service in s.placement:
            assert step.devices == s.placement[step.service], "moved a placed service"
        if step.action == "start":
            assert len(set(step.devices)) == spec.gpus
            assert spec.devices is None or set(step.devices) <= set(spec.devices)
        # a start waits only for releases on its own cards
        for j in step.after:
            assert set(result.steps[j].devices) & set(step.devices), (step, result.steps[j])


def test_single_card_states_plan_exactly_as_before() -> None:
    # No `devices`: the planner is the single-card one, steps carry no card.
    i = inv(ServiceSpec("a", 20 * GB, 1), ServiceSpec("b", 20 * GB, 5))
    single = ObservedState(24 * GB, {"a": None})
    p = ok(plan(i, single, StartService("b")))
    assert [(s.action, s.service, s.devices) for s in p.steps] == [
        ("stop", "a", ()), ("start", "b", ())]
    assert p.steps[1].mb == 20 * GB and p.steps[1].after == (0,)


def test_a_multi_card_service_is_released_once_whatever_each_card_asked() -> None:
    # Card 0 needs tp stopped (its sleep keeps too much there), card 1 would only sleep it:
    # one stop on both cards, never a stop and a sleep racing on one unit.
    i = inv(ServiceSpec("s1", 8 * GB, preemptible=False),
            ServiceSpec("tp", GB, residual_mb=GB, gpus=2, preemptible=False),
            phases={1: PhaseSpec(1, "p", (), ("s1",))})
    cards = {0: DeviceBudget(8 * GB), 1: DeviceBudget(8 * GB)}
    p = ok(plan(i, state({"s1": None, "tp": None}, devices=cards, s1=(0,), tp=(0, 1)),
                PreparePhase(1)))
    assert [(s.action, s.service, s.devices, s.mb) for s in p.steps] == [
        ("stop", "tp", (0, 1), 2 * GB)]


def test_a_multi_card_service_is_counted_as_measured_on_each_card() -> None:
    i = inv(ServiceSpec("tp", 10 * GB, gpus=2), ServiceSpec("x", 9 * GB))
    uneven = dataclasses.replace(state({"tp": 30 * GB}, tp=(0, 1)),
                                 card_mb={"tp": {0: 25 * GB, 1: 5 * GB}})
    # evenly split it would look like 15 GB on each, and card 0 the best fit for 9 GB
    assert ok(plan(i, uneven, StartService("x"))).steps[0].devices == (1,)


def test_a_service_on_a_card_no_longer_managed_is_refused_not_crashed() -> None:
    i = inv(ServiceSpec("x", 4 * GB, residual_mb=GB), phases={1: PhaseSpec(1, "", ("x",))})
    gone = state({}, {"x": GB}, x=(2,))
    for request in (StartService("x"), PreparePhase(1)):
        refused = plan(i, gone, request)
        assert isinstance(refused, Refusal) and refused.code == "unmanaged_device", refused
        assert "GPU 2" in refused.message and "(gpu devices: 0, 1)" in refused.message
    assert ok(plan(i, gone, Prewarm(None, ("x",)))).steps == ()
    assert ok(plan(i, gone, StopService("x"))).steps[0].action == "stop"


def test_short_mb_is_what_every_needed_card_lacks() -> None:
    i = inv(ServiceSpec("a", 20 * GB, 9, preemptible=False),
            ServiceSpec("b", 20 * GB, 9, preemptible=False), ServiceSpec("tp", 10 * GB, gpus=2))
    refused = plan(i, state({"a": None, "b": None}, a=(0,), b=(1,)), StartService("tp"))
    assert isinstance(refused, Refusal) and refused.short_mb == 2 * 6 * GB
    one = plan(i, state({"a": None}, a=(0,)), StartService("tp"))
    assert isinstance(one, Refusal) and one.short_mb == 6 * GB
