"""Learned costs: each service's measured starts, wakes, sleeps, stops and reclaim waits (the
median of the last 20), kept across restarts, and the planner's use of them."""

from __future__ import annotations

from pathlib import Path

from gpu_manager.orchestrator.costs import Costs
from gpu_manager.planner import (
    ObservedState,
    Plan,
    PlannerInventory,
    ServiceSpec,
    StartService,
    plan,
)
from tests.support.daemon import DaemonProc
from tests.support.env import wait_for


def test_among_equals_the_cheapest_to_bring_back_goes_first() -> None:
    def inv(a: float | None, b: float | None) -> PlannerInventory:
        return PlannerInventory({
            "a": ServiceSpec("a", 6000, 5, start_s=a), "b": ServiceSpec("b", 6000, 5, start_s=b),
            "big": ServiceSpec("big", 14000, 50)})

    state = ObservedState(23552, {"a": 6000, "b": 6000})

    def victim(a: float | None, b: float | None) -> str:
        result = plan(inv(a, b), state, StartService("big"))
        assert isinstance(result, Plan)
        (stop,) = [s.service for s in result.steps if s.action == "stop"]
        return stop

    assert victim(None, None) == "a"  # unmeasured: as before (by size, then name)
    assert victim(30.0, 2.0) == "b"  # b comes back in 2 s, a in 30 s
    result = plan(inv(30.0, 2.0), state, StartService("big"))
    assert isinstance(result, Plan)
    assert "back in ~2.0s by start" in result.steps[0].reason  # what `plan` explains
    assert victim(None, 2.0) == "b"  # the measured cheap one before the unknown
    # a sleeper comes back by its wake: cheaper than a cold start measured faster
    sleepy = PlannerInventory({
        "a": ServiceSpec("a", 6000, 5, residual_mb=300, start_s=1.0, wake_s=5.0),
        "b": ServiceSpec("b", 6000, 5, residual_mb=300, start_s=20.0, wake_s=0.3),
        "big": ServiceSpec("big", 17000, 50)})
    result = plan(sleepy, state, StartService("big"))
    assert isinstance(result, Plan)
    assert [(s.action, s.service) for s in result.steps if s.service != "big"] == [
        ("sleep", "b")]


async def test_costs_are_kept_and_a_damaged_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "costs.json"
    costs = Costs(path, keep=3)
    for seconds in (1.0, 2.0, 9.0, 3.0):  # the last three are kept
        costs.record("vidi", "start", seconds)
    costs.record("vidi", "nonsense", 1.0)
    await costs.flush()
    again = Costs(path, keep=3)
    assert again.of("vidi") == {"start": {"p50_s": 3.0, "n": 3}}
    assert again.back_in("vidi", asleep=True) == 3.0  # never woken: its start
    path.write_text("{not json")
    fresh = Costs(path)
    assert fresh.as_dict() == {}
    assert [p.name for p in tmp_path.iterdir() if ".damaged-" in p.name]


def test_the_daemon_learns_what_each_start_and_stop_costs_and_keeps_it(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()
    try:
        for _ in range(2):
            assert d.post("/gpu/service/vidi/start").status_code == 200
            assert d.post("/gpu/service/vidi/stop").status_code == 200
        costs = d.status()["services"]["vidi"]["costs"]
        assert costs["start"]["n"] == 2 and costs["stop"]["n"] == 2
        assert 0.4 <= costs["start"]["p50_s"] < 10  # its --startup-s is 0.5
        metrics = d.get("/metrics").text
        assert 'gpu_manager_service_cost_seconds{kind="start",service="vidi"}' in metrics
        d.kill()  # a graceful stop writes what was learned
        d.proc = None
        d.start()
        wait_for(lambda: d.status()["services"]["vidi"]["costs"].get("start", {}).get("n") == 2,
                 5, "the costs after a restart")
    finally:
        d.close()
