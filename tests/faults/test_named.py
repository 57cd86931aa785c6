"""Named faults at each await point, in-process on fakes: every call returns within its bound,
the unit ends in a state that says why, the lock is free, the books match the fakes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from gpu_manager.aio import Supervisor, settle
from gpu_manager.config import load_inventory
from gpu_manager.orchestrator import Operation, OperationError
from gpu_manager.orchestrator.ledger import ClientLease, Ledger
from gpu_manager.planner import (
    PreparePhase,
    SleepService,
    StartService,
    StopService,
    used_mb,
)
from gpu_manager.units import ServiceState
from gpu_manager.units.states import TRANSITIONS, InvalidTransition, allowed
from tests.faults.fakes import BASE_SERVICES, Fault, World, base_config, service_yaml
from tests.support.env import until

S = ServiceState


async def run(w: World, req: StartService | StopService | PreparePhase | SleepService,
              limit: float = 20) -> tuple[Operation, OperationError | None, float]:
    op = Operation(req)
    t0 = time.monotonic()
    error = None
    try:
        async with asyncio.timeout(limit):
            await w.orch.execute(op)
    except OperationError as exc:
        error = exc
    took = time.monotonic() - t0
    if op.deadline_s is not None:
        assert took <= op.deadline_s + 0.5, f"{op.label} took {took:.2f}s > {op.deadline_s}"
    return op, error, took


def lock_free(w: World) -> bool:
    return w.lock._hold is None and not w.orch.keeper.holders


async def test_health_checker_that_raises_fails_the_start_not_the_daemon(world: World) -> None:
    # The bug as seen: a checker raising something that is not an HTTPError killed the start
    # task silently, the unit stayed `starting` and the transition never answered.
    for kind in ("invalid-url", "bug"):
        world.faults.arm("vidi", "health", Fault(kind))  # type: ignore[arg-type]
        op, error, _took = await run(world, StartService("vidi"))
        assert error is not None and error.code == "start_failed", op.error
        assert "internal error in start" in error.detail
        unit = world.units["vidi"]
        assert unit.state == S.FAILED and unit.faults >= 1
        assert not world.driver_of("vidi").alive  # what it launched was stopped
        assert lock_free(world)
    op, error, _ = await run(world, StartService("vidi"))  # and the next start just works
    assert error is None and world.units["vidi"].state == S.READY


async def test_driver_start_that_hangs_fails_at_the_start_timeout(world: World) -> None:
    world.faults.arm("vidi", "start", Fault("hang"))
    _op, error, took = await run(world, StartService("vidi"))
    assert error is not None and error.code == "start_failed"
    assert "did not finish within 0.5s" in error.detail
    assert 0.5 <= took < 2.0 and world.units["vidi"].state == S.FAILED
    assert lock_free(world) and error.extra["gpu_state"]["vidi"] == "failed"


async def test_driver_stop_that_hangs_fails_the_stop_and_frees_the_lock(world: World) -> None:
    await run(world, StartService("vidi"))
    world.faults.arm("vidi", "stop", Fault("hang"))
    _op, error, took = await run(world, StopService("vidi"))
    assert error is not None and error.code == "stop_failed"
    unit = world.units["vidi"]
    assert unit.state == S.FAILED and "did not finish within" in unit.reason
    assert took < unit.stop_bound_s + 1 and lock_free(world)
    # the process is still there (a hung stop): the planner still counts it as vidi's
    assert world.driver_of("vidi").alive and world.units["vidi"].holds_gpu
    assert "vidi" in world.orch.observed().running
    # a later stop finishes the job
    _op, error, _ = await run(world, StopService("vidi"))
    assert error is None and not world.driver_of("vidi").alive


async def test_unreadable_pids_fall_back_to_free_memory_and_say_so(world: World) -> None:
    world.gpu.foreign_mb = 4000  # a desktop: comfyui (12000) needs vidi's room (4000)
    await run(world, PreparePhase(2))
    for _ in range(2):  # the pid refresh before planning, then the stop's own read
        world.faults.arm("vidi", "pids", Fault("raise"))
    op, error, _ = await run(world, PreparePhase(4))
    assert error is None, op.error
    stop = next(s for s in op.steps if s.action == "stop")
    start = next(s for s in op.steps if s.action == "start")
    assert start.after == [0]  # it needs vidi's VRAM
    assert "pid list unavailable" in (stop.detail or "")
    assert "free memory alone" in (start.detail or "")
    assert world.gpu.oom == []


async def test_probe_that_fails_or_hangs_is_an_error_not_fresh_evidence(world: World) -> None:
    await run(world, PreparePhase(4))
    armed_at = time.monotonic()
    world.faults.arm("gpu", "sample", Fault("raise"))
    await until(lambda: world.poller.latest.error is not None, 2, "a failed sample")
    # The failed sample ran after `armed_at`; its snapshot carries the last good data's
    # timestamp, so it can never pass for evidence taken after a later stop.
    assert world.poller.latest.taken_at <= armed_at
    assert world.poller.latest.devices, "the last good data is still shown"
    await until(lambda: world.poller.latest.error is None, 2, "the probe back")
    # A hung sample: reported after probe_sample_s; no second call queued behind it.
    hits = world.faults.hit_count
    world.faults.arm("gpu", "sample", Fault("hang"))
    await until(lambda: "no answer from the driver" in (world.poller.latest.error or ""), 3,
                "the hung sample reported")
    assert world.faults.hit_count == hits + 1
    await until(lambda: world.poller.latest.error is None, 5, "the probe back")


async def test_reclaim_during_a_probe_outage_times_out_and_says_why(world: World) -> None:
    await run(world, PreparePhase(2))
    for _ in range(1000):  # outlasts the reclaim timeout even at the fast poll rate
        world.faults.arm("gpu", "sample", Fault("raise"))
    await until(lambda: world.poller.latest.error is not None, 2, "the outage seen")
    op, error, _ = await run(world, PreparePhase(4))  # comfyui would fit: but on what data?
    assert error is not None and error.code == "reclaim_timeout"
    assert "the probe fails" in error.detail and lock_free(world)
    world.faults.clear()
    op, error, _ = await run(world, PreparePhase(4))
    assert error is None, op.error


async def test_a_sleep_that_keeps_its_memory_is_stopped_instead(world: World) -> None:
    await run(world, PreparePhase(3))  # cosyvoice (+ ollama kept if it ran)
    await run(world, StartService("ollama"))
    world.faults.arm("ollama", "release", Fault("late"))  # answers, frees nothing
    op, error, _ = await run(world, StartService("comfyui"))
    assert error is None, op.error
    step = next(s for s in op.steps if s.service == "ollama")
    assert step.action == "sleep" and "still holds 8000 MB" in (step.detail or ""), step
    assert "stopped instead" in (step.detail or "")
    assert world.units["ollama"].state == S.STOPPED
    assert world.gpu.oom == []


async def test_a_sleep_that_hangs_falls_back_to_a_stop(world: World) -> None:
    await run(world, PreparePhase(1))  # whisper (pausable), 6000
    await run(world, StartService("vidi"))  # 4000: comfyui's 12000 needs whisper's room
    world.faults.arm("whisper", "release", Fault("hang"))
    op, error, _took = await run(world, StartService("comfyui"))
    assert error is None, op.error
    stop = next(s for s in op.steps if s.service == "whisper")
    assert "stopped instead" in (stop.detail or "") and "no answer" in (stop.detail or "")
    assert world.units["whisper"].state == S.STOPPED


async def test_removing_sleeping_services_keeps_the_books_consistent(world: World,
                                                                     tmp_path: Path) -> None:
    await run(world, PreparePhase(1))
    await run(world, StartService("ollama"))
    await run(world, StartService("comfyui"))  # puts whisper and ollama to sleep for room
    idle = {n for n, u in world.units.items() if u.state == S.SLEEPING}
    assert idle, "expected a sleeping service"
    services = {k: v for k, v in BASE_SERVICES.items() if k not in idle}
    base_config(tmp_path, services)
    res = await world.orch.apply_inventory(load_inventory(tmp_path), world)
    assert sorted(res.removed) == sorted(idle) and not res.kept
    assert not world.orch.observed().sleeping
    for name in idle:
        assert name not in world.units
        assert all(not d.alive for d in world.drivers if d.name == name)
    await world.orch.refresh_pids()  # used to raise KeyError on every transition
    op, error, _ = await run(world, PreparePhase(2))
    assert error is None, op.error


async def test_reload_changes_go_through_the_unit(world: World, tmp_path: Path) -> None:
    await run(world, StartService("vidi"))
    old_driver = world.driver_of("vidi")
    services = dict(BASE_SERVICES, vidi=service_yaml("vidi", 3000, 40))
    base_config(tmp_path, services)
    res = await world.orch.apply_inventory(load_inventory(tmp_path), world)
    assert res.changed == ["vidi"]
    # still running on its old definition and driver (which knows its process)
    assert world.driver_of("vidi") is old_driver and old_driver.alive
    await run(world, StopService("vidi"))
    await run(world, StartService("vidi"))
    new_driver = world.driver_of("vidi")
    assert new_driver is not old_driver and new_driver.alive
    assert new_driver.cfg.vram_mb == 3000 and world.units["vidi"].cfg.vram_mb == 3000


async def test_removed_service_whose_stop_fails_stays_counted(world: World,
                                                              tmp_path: Path) -> None:
    await run(world, StartService("vidi"))
    world.faults.arm("vidi", "stop", Fault("raise"))
    base_config(tmp_path, {k: v for k, v in BASE_SERVICES.items() if k != "vidi"})
    res = await world.orch.apply_inventory(load_inventory(tmp_path), world)
    assert "vidi" in res.kept and "vidi" in world.units
    await world.poller.next_snapshot(1)
    # not in the inventory any more, but its memory is still on the GPU and counted
    seen = world.orch.observed()
    assert seen.running.get("vidi") == 4000
    assert used_mb(world.orch.planner_inventory(), seen) >= 4000
    res = await world.orch.apply_inventory(load_inventory(tmp_path), world)
    assert res.removed == ["vidi"] and "vidi" not in world.units


async def test_declined_restart_is_retried(world: World) -> None:
    await run(world, PreparePhase(3))  # cosyvoice: restart on-failure
    await run(world, StartService("comfyui"))  # 12000 + 4000 of 19000: cosyvoice stays
    # (with its pid: the lease's own memory is its process's, so the desktop's below is not
    # taken for the lease's, as it would be for a lease without a pid)
    lease = await world.leases.acquire("hog", "test", 1, 2000, vram_mb=3000, ttl_s=5,
                                       pid=os.getpid())
    assert lease.lease is not None
    world.gpu.foreign_mb = 1000  # a desktop: 12000 + 3000 + 4000 no longer fit in 18000
    await world.poller.next_snapshot(1)
    world.driver_of("cosyvoice").crash()
    unit = world.units["cosyvoice"]
    await until(lambda: "declined" in unit.reason, 3, "a declined restart")
    assert unit.state == S.FAILED
    assert unit.state == S.FAILED and unit.restarts.count == 0
    await world.leases.release("hog")
    await until(lambda: unit.state == S.READY, 5, "the retried restart")
    assert unit.restarts.count == 1
    assert world.gpu.oom == []


async def test_lease_is_active_and_expiring_in_one_step() -> None:
    ledger = Ledger()
    ledger.add_pending(ClientLease("a", "me", 90, 1, 100, 0.5))
    assert ledger.expired(time.monotonic() + 100) == []  # pending never expires
    lease = ledger.activate("lease:a")
    assert lease is not None and lease.active and lease.acquired_at is not None
    assert lease.expires > time.monotonic()  # never active with a stale expiry
    assert ledger.release("lease:b") is None
    ledger.add_pending(ClientLease("b", "me", 90, 1, 100, 0.5))
    assert ledger.release("lease:b") is None  # an acquire in flight is left alone
    assert ledger.lease("lease:b") is not None


async def test_supervisor_restarts_a_crashed_task_and_gives_up_visibly() -> None:
    sup = Supervisor(base_s=0.01, max_s=0.02, limit=3, window_s=10)
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 2:
            raise RuntimeError("first run fails")
        await asyncio.sleep(3600)

    async def broken() -> None:
        raise ValueError("always")

    sup.spawn("flaky", flaky)
    sup.spawn("broken", broken)
    await until(lambda: sup.health["broken"].gave_up and len(runs) == 2, 2, "supervision")
    assert sup.health["flaky"].ok and sup.health["flaky"].crashes == 1
    assert not sup.ok and sup.problems()["broken"]["last_error"] == "ValueError: always"
    await sup.close(1)  # never re-raises what the tasks raised


async def test_settle_never_reraises() -> None:
    async def boom() -> None:
        raise RuntimeError("old error")

    task = asyncio.create_task(boom())
    await asyncio.wait([task])  # it has raised, and nobody retrieved the error yet
    await settle([task], 1)
    assert task.done() and not task.cancelled()


def test_transition_table_is_closed_and_enforced() -> None:
    for old, news in TRANSITIONS.items():
        assert old not in news, f"{old} -> itself: a new reason is a note, not a transition"
        for new in S:
            assert allowed(old, new) == (new in news)
    assert not allowed(S.STOPPED, S.READY)  # never ready without starting
    assert not allowed(S.STOPPING, S.STARTING)
    assert str(InvalidTransition("x", S.STOPPED, S.READY)) == \
        "x: stopped -> ready is not an allowed transition"


async def test_unit_refuses_an_invalid_transition(world: World) -> None:
    unit = world.units["vidi"]
    await run(world, StartService("vidi"))
    with pytest.raises(InvalidTransition):
        unit._set(S.STARTING, "bug")  # ready -> starting is not allowed
    assert unit.state == S.READY


@pytest.mark.parametrize("kind", ["late", "hang", "raise"])
async def test_a_wake_that_fails_starts_the_service_cold(world: World, kind: str) -> None:
    await run(world, StartService("vllm"))  # 5000, sleeps to 300
    await run(world, SleepService("vllm"))
    assert world.units["vllm"].state == S.SLEEPING
    # late: a refused wake (CUDA OOM); hang: no answer within wake_timeout_s; raise: a bug
    world.faults.arm("vllm", "resume", Fault(kind))
    op, error, _ = await run(world, StartService("vllm"))
    assert error is None, op.error
    (wake,) = op.steps
    assert wake.action == "wake" and "started cold instead" in (wake.detail or ""), wake
    assert world.units["vllm"].state == S.READY
    assert lock_free(world) and world.gpu.oom == []
    alive = [d for d in world.drivers if d.name == "vllm" and d.alive]
    assert len(alive) == 1  # the sleeper was stopped before the cold start


async def test_a_sleep_that_raises_is_stopped_and_the_unit_stays_consistent(
        world: World) -> None:
    await run(world, StartService("vllm"))
    world.faults.arm("vllm", "release", Fault("raise"))
    op, error, _ = await run(world, SleepService("vllm"))
    # a sleep asked for by name that ended in a stop says so: not a success
    assert error is not None and error.code == "sleep_failed", op.error
    assert error.extra["success"] is False and error.extra["stopped"] is True
    assert "stopped instead" in error.detail
    step = next(s for s in op.steps if s.service == "vllm")
    assert step.action == "sleep" and "sleep failed" in (step.detail or ""), step
    assert "stopped instead" in (step.detail or "")
    assert world.units["vllm"].state == S.STOPPED and world.units["vllm"].faults == 0


async def test_a_sleeping_service_that_takes_its_memory_back_is_awake(world: World) -> None:
    await run(world, StartService("vllm"))
    await run(world, SleepService("vllm"))
    unit = world.units["vllm"]
    assert unit.state == S.SLEEPING
    driver = world.driver_of("vllm")
    assert driver.pid is not None
    world.gpu.set_mb(driver.pid, 5000)  # a request made it load its model again
    await until(lambda: world.orch.measured("vllm") == 5000, 2, "the GPU to show it")
    await world.orch.refresh_pids()
    assert unit.state == S.READY and "more than its 600 MB residual" in unit.reason


async def test_a_failing_branch_of_a_graph_ends_the_plan_cleanly(world: World) -> None:
    # phase 6 (vllm) running; phase 5 puts it to sleep and starts vidi and cosyvoice side by
    # side. vidi's launch raises: cosyvoice (an independent branch) still finishes, the
    # operation fails with vidi's reason and the GPU state, and nothing is left half-done.
    await run(world, PreparePhase(6))
    world.faults.arm("vidi", "start", Fault("raise"))
    op, error, _ = await run(world, PreparePhase(5))
    assert error is not None and error.code == "start_failed", op.error
    assert "vidi" in error.detail and error.extra["gpu_state"]["cosyvoice"] == "ready"
    status = {s.service: (s.action, s.status) for s in op.steps}
    assert status == {"vllm": ("sleep", "done"), "vidi": ("start", "failed"),
                      "cosyvoice": ("start", "done")}, status
    assert world.units["vidi"].state == S.FAILED and not world.driver_of("vidi").alive
    assert lock_free(world) and not world.orch.busy and world.gpu.oom == []
    assert world.orch.current_phase == 6  # the phase did not change


async def test_a_sleeper_that_waits_for_room_wakes_after_a_stop(world: World) -> None:
    await run(world, StartService("whisper"))  # sleep: {api: pause, wake_when_free: true}
    await run(world, StartService("vidi"))
    await run(world, StartService("comfyui"))  # 12000 beside 10000: whisper (30) sleeps
    assert world.units["whisper"].state == S.SLEEPING
    await run(world, PreparePhase(2))  # a phase releases comfyui: not a reason to wake it
    assert not world.orch.followups.tasks and world.units["whisper"].state == S.SLEEPING
    await run(world, StartService("comfyui"))
    await run(world, StopService("comfyui", force=True))  # a release: whisper fits again
    await until(lambda: world.units["whisper"].state == S.READY, 3, "whisper awake")
    wakes = [op for op in world.orch.ops.recent(10) if op.label.startswith("Prewarm:whisper")]
    assert wakes and wakes[-1].status == "succeeded" and wakes[-1].steps[0].action == "wake"
