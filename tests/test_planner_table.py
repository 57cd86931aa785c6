"""The planner on the reference inventory (interfaces.md §2): the seed's sequences, step by step."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_manager.config import load_inventory
from gpu_manager.planner import (
    FOREIGN,
    ObservedState,
    Plan,
    PlannerInventory,
    PreparePhase,
    Refusal,
    Request,
    ServiceSpec,
    StartService,
    StopAll,
    StopService,
    choose_victims,
    plan,
)


@pytest.fixture(scope="module")
def inv(repo_root: Path) -> PlannerInventory:
    return PlannerInventory.from_inventory(load_inventory(repo_root))


def run(inv: PlannerInventory, req: Request, running: dict[str, int | None] | None = None,
        foreign: int = 0, phase: int | None = None) -> Plan | Refusal:
    return plan(inv, ObservedState(24576, running or {}, 1024, foreign, phase), req)


def steps(result: Plan | Refusal) -> list[tuple[str, str]]:
    assert isinstance(result, Plan), result
    return [(s.action, s.service) for s in result.steps]


def test_ac1_phase_sequence(inv: PlannerInventory) -> None:
    assert steps(run(inv, PreparePhase(2))) == [("start", "vidi")]
    p3 = run(inv, PreparePhase(3), {"vidi": None}, phase=2)
    assert steps(p3) == [("stop", "vidi"), ("start", "cosyvoice")]
    assert isinstance(p3, Plan) and p3.steps[0].reason == "not in phase 3 (tts)"
    p4 = run(inv, PreparePhase(4), {"cosyvoice": None}, phase=3)
    assert steps(p4) == [("stop", "cosyvoice"), ("start", "comfyui")]
    assert isinstance(p4, Plan)
    assert (p4.used_before_mb, p4.used_after_mb, p4.budget_mb) == (4000, 20000, 23552)


def test_ac3_start_comfyui_preempts_cosyvoice(inv: PlannerInventory) -> None:
    result = run(inv, StartService("comfyui"), {"cosyvoice": None})
    assert steps(result) == [("stop", "cosyvoice"), ("start", "comfyui")]
    assert isinstance(result, Plan)
    stop = result.steps[0]
    assert stop.preemption and stop.mb == 4000
    assert stop.reason == "preempted by comfyui (priority 50 < 100)"


def test_preempts_only_what_is_needed_lowest_first(inv: PlannerInventory) -> None:
    # ollama (10) + vidi (40) = 22000 of 23552; cosyvoice (50) needs 4000, 2448 short. vidi alone
    # would free enough with less MB lost, but ollama has the lower priority, so it goes.
    result = run(inv, StartService("cosyvoice"), {"ollama": None, "vidi": None})
    assert steps(result) == [("stop", "ollama"), ("start", "cosyvoice")]
    # comfyui needs 20000: stopping ollama is not enough beside vidi, so both go, lowest first.
    result = run(inv, StartService("comfyui"), {"ollama": None, "vidi": None})
    assert steps(result) == [("stop", "ollama"), ("stop", "vidi"), ("start", "comfyui")]


def test_refusal_names_blockers_and_shortfall(inv: PlannerInventory) -> None:
    result = run(inv, StartService("cosyvoice"), {"comfyui": None})
    assert isinstance(result, Refusal)
    assert result.code == "insufficient_vram"
    assert result.short_mb == 448  # 20000 + 4000 - 23552
    assert [(b.name, b.mb, b.reason) for b in result.blockers] == [
        ("comfyui", 20000, "priority 100 >= 50")
    ]
    assert "448 MB short" in result.message and "comfyui (20000 MB" in result.message


def test_measured_usage_above_declared_counts(inv: PlannerInventory) -> None:
    # vidi measured at 7000 MB (declared 4000): cosyvoice 4000 + vidi 7000 + ollama 18000 > budget
    result = run(inv, StartService("cosyvoice"), {"vidi": 7000, "ollama": None})
    assert steps(result) == [("stop", "ollama"), ("start", "cosyvoice")]
    assert isinstance(result, Plan) and result.used_before_mb == 25000


def test_foreign_usage_shrinks_budget_and_blocks(inv: PlannerInventory) -> None:
    result = run(inv, StartService("comfyui"), {}, foreign=4000)
    assert isinstance(result, Refusal)
    assert result.short_mb == 448
    assert [(b.name, b.mb) for b in result.blockers] == [(FOREIGN, 4000)]


def test_keep_stays_when_it_fits_and_goes_when_not(inv: PlannerInventory) -> None:
    assert steps(run(inv, PreparePhase(2), {"ollama": None})) == [("start", "vidi")]
    assert steps(run(inv, PreparePhase(1), {"cosyvoice": None, "ollama": None})) == [
        ("stop", "cosyvoice")
    ]
    p4 = run(inv, PreparePhase(4), {"ollama": None, "vidi": None})
    assert steps(p4) == [("stop", "vidi"), ("stop", "ollama"), ("start", "comfyui")]


def test_phase_already_prepared_is_a_no_op(inv: PlannerInventory) -> None:
    result = run(inv, PreparePhase(4), {"comfyui": None}, phase=4)
    assert steps(result) == []


def test_stop_guarded_by_current_phase(inv: PlannerInventory) -> None:
    refused = run(inv, StopService("vidi"), {"vidi": None}, phase=2)
    assert isinstance(refused, Refusal) and refused.code == "needed_by_phase"
    assert "force=true" in refused.message
    assert steps(run(inv, StopService("vidi", force=True), {"vidi": None}, phase=2)) == [
        ("stop", "vidi")
    ]
    assert steps(run(inv, StopService("vidi"), {})) == []


def test_unknown_names(inv: PlannerInventory) -> None:
    for req in (StartService("nope"), StopService("nope")):
        r = run(inv, req)
        assert isinstance(r, Refusal) and r.code == "unknown_service"
        assert "known: comfyui, cosyvoice, ollama, vidi" in r.message
    r = run(inv, PreparePhase(7))
    assert isinstance(r, Refusal) and r.code == "unknown_phase"
    assert "known: 1, 2, 3, 4, 5" in r.message


def test_stop_all_lowest_priority_first(inv: PlannerInventory) -> None:
    result = run(inv, StopAll(), {"comfyui": None, "ollama": None, "vidi": None})
    assert steps(result) == [("stop", "ollama"), ("stop", "vidi"), ("stop", "comfyui")]


def test_non_preemptible_is_never_a_victim() -> None:
    inv = PlannerInventory({
        "low": ServiceSpec("low", 6000, 1, preemptible=False),
        "mid": ServiceSpec("mid", 3000, 5),
        "big": ServiceSpec("big", 8000, 9),
    })
    result = plan(inv, ObservedState(12000, {"low": None, "mid": None}), StartService("big"))
    assert isinstance(result, Refusal)
    assert [(b.name, b.reason) for b in result.blockers] == [("low", "not preemptible")]
    assert result.short_mb == 2000


def test_victims_prefer_lower_priority_over_fewer() -> None:
    cands = [("a", 3000, 10), ("b", 3000, 20), ("c", 5000, 30)]
    assert sorted(choose_victims(cands, 5000) or []) == ["a", "b"]
    # at the same ceiling, the fewest: one 5000 beats two 3000s
    cands = [("a", 3000, 10), ("b", 3000, 10), ("c", 5000, 10)]
    assert choose_victims(cands, 5000) == ["c"]
    assert choose_victims(cands, 12000) is None
    assert choose_victims(cands, 0) == []


def test_a_sleeper_stays_asleep_when_the_kept_ones_released_after_it_leave_room() -> None:
    # Its residual alone did not cover the phase, so it was stopped; then the kept service
    # had to go too, and beside the phase there is room for that residual after all: it
    # sleeps rather than stops (a found case of the sleepers' property test).
    from gpu_manager.planner import PhaseSpec

    i = PlannerInventory({
        "a": ServiceSpec("a", 2000, 1, residual_mb=1000),
        "k": ServiceSpec("k", 5000, 0),
        "p": ServiceSpec("p", 6000, 5)}, {1: PhaseSpec(1, "big", ("p",), ("k",))})
    result = plan(i, ObservedState(10_000, {"a": None, "k": None}), PreparePhase(1))
    assert isinstance(result, Plan), result
    assert [(s.action, s.service) for s in result.steps] == [
        ("sleep", "a"), ("stop", "k"), ("start", "p")]
    assert result.used_after_mb == 7000 and result.free_after_mb == 3000
