"""Host RAM that sleeping services fill (`host:`, `sleep.host_ram_mb`): the planner's rule, and
the real daemon on the simulated host."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_manager.planner import (
    ObservedState,
    Plan,
    PlannerInventory,
    ServiceSpec,
    StartService,
    plan,
)
from tests.support.daemon import DaemonProc
from tests.support.env import free_port
from tests.support.served import served


def test_a_sleep_the_host_cannot_hold_is_a_stop_and_says_so() -> None:
    """Host RAM goes to the sleeps of a plan by priority; the rest are stopped."""
    inv = PlannerInventory({
        "low": ServiceSpec("low", 6000, 1, residual_mb=300, host_ram_mb=5000),
        "mid": ServiceSpec("mid", 6000, 5, residual_mb=300, host_ram_mb=5000),
        "big": ServiceSpec("big", 20000, 50)})
    running = {"low": 6000, "mid": 6000}
    roomy = plan(inv, ObservedState(23552, running, host_free_mb=20000), StartService("big"))
    assert isinstance(roomy, Plan)
    assert sorted((s.action, s.service) for s in roomy.steps) == [
        ("sleep", "low"), ("sleep", "mid"), ("start", "big")]
    tight = plan(inv, ObservedState(23552, running, host_free_mb=7000), StartService("big"))
    assert isinstance(tight, Plan)
    steps = {s.service: s for s in tight.steps}
    assert steps["mid"].action == "sleep"  # the higher priority keeps the cheap way back
    assert steps["low"].action == "stop" and steps["low"].mb == 6000
    assert "host RAM (its sleep holds 5000 MB, 2000 MB free)" in steps["low"].reason
    unknown = plan(inv, ObservedState(23552, running), StartService("big"))  # no figure
    assert isinstance(unknown, Plan)
    assert {s.action for s in unknown.steps if s.service != "big"} == {"sleep"}


@pytest.mark.parametrize("host_ram", [9000, 3000])
def test_the_daemon_sleeps_only_what_the_host_can_hold(tmp_path: Path, host_ram: int) -> None:
    """The root inventory's comfyui (20000 MB, priority 100) needs llm-a's room; llm-a can
    sleep, and its sleep holds `host_ram` MB of a simulated host with 6000 MB to spare."""
    extra = served("llm-a", free_port(), "model-a", vram=6000).replace(
        "residual_mb: 500, timeout_s: 5}",
        f"residual_mb: 500, timeout_s: 5, host_ram_mb: {host_ram}}}")
    host = "\nhost: {simulated_total_mb: 8000, ram_reserve_mb: 2000}\n"
    d = DaemonProc(tmp_path, extra_services=extra,
                   replace={"\nservices:\n": host + "services:\n"})
    d.start()
    try:
        assert d.post("/gpu/service/llm-a/start").status_code == 200
        assert d.status()["host"] == {"ram_free_mb": 6000, "ram_reserve_mb": 2000,
                                      "held_by_sleepers_mb": 0, "simulated": True}
        r = d.post("/gpu/service/comfyui/start")
        assert r.status_code == 200, r.text
        step = next(s for s in r.json()["plan"]["steps"] if s["service"] == "llm-a")
        svc = d.status()["services"]["llm-a"]
        assert (svc["host_ram_mb"], svc["host_ram_measured"]) == (host_ram, False)
        if host_ram > 6000:
            assert step["action"] == "stop"
            assert "host RAM (its sleep holds 9000 MB, 6000 MB free)" in step["reason"]
            assert svc["state"] == "stopped"
            assert d.status()["host"]["held_by_sleepers_mb"] == 0
        else:
            assert step["action"] == "sleep" and svc["state"] == "sleeping"
            assert d.status()["host"]["held_by_sleepers_mb"] == 3000
            assert d.status()["host"]["ram_free_mb"] == 3000
    finally:
        d.close()
