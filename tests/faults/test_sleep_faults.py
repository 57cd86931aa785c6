"""Sleep, wake and prewarm under races and reloads, in-process on the fakes (from a review of
the sleep/wake change: each of these failed before its fix)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from gpu_manager.config import load_inventory
from gpu_manager.orchestrator import Operation, OperationError
from gpu_manager.planner import PreparePhase, Prewarm, Request, SleepService, StartService
from gpu_manager.units import Outcome, ServiceState
from tests.faults.fakes import BASE_SERVICES, World, base_config, service_yaml
from tests.support.env import until

S = ServiceState


async def run(w: World, req: Request) -> Operation:
    op = Operation(req)
    try:
        async with asyncio.timeout(20):
            await w.orch.execute(op)
    except OperationError:
        pass
    return op


async def test_a_woken_service_is_recorded_awake(world: World) -> None:
    await run(world, StartService("vllm"))
    await run(world, SleepService("vllm"))
    assert world.store.units["vllm"].get("asleep") is True  # a restart would adopt it asleep
    await run(world, StartService("vllm"))
    assert world.units["vllm"].state == S.READY
    assert not world.store.units["vllm"].get("asleep"), world.store.units["vllm"]


async def test_a_reading_from_before_the_sleep_does_not_wake_it(world: World) -> None:
    await run(world, StartService("vllm"))
    await until(lambda: world.orch.measured("vllm") == 5000, 2, "measured")

    async def frees_later(name: str, *args: object) -> Outcome:
        # answers now; the GPU shows it a moment later (ComfyUI's /free)
        pid = world.driver_of(name).pid
        asyncio.get_running_loop().call_later(0.5, world.gpu.set_mb, pid, 300)
        return Outcome(True, "asked to free")

    world.sleep = frees_later  # type: ignore[method-assign]
    unit = world.units["vllm"]
    assert (await unit.sleep("test")).ok  # the executor's first await ...
    await world.orch.refresh_pids()  # ... and a periodic refresh before anything else
    assert unit.state == S.SLEEPING, (unit.state, unit.reason)


async def test_a_prewarmed_service_that_died_is_itself_again(world: World) -> None:
    assert (await run(world, Prewarm(2))).status == "succeeded"  # vidi, prewarmed
    assert world.orch.followups.live() == {"vidi"}
    world.driver_of("vidi").crash()
    await until(lambda: world.units["vidi"].state in (S.FAILED, S.STOPPED), 2, "vidi down")
    assert world.orch.followups.live() == frozenset()
    await run(world, StartService("comfyui"))
    await run(world, StartService("vllm"))
    op = await run(world, StartService("vidi"))  # 40 > 20: the sleeping vllm makes room
    assert op.status == "succeeded", op.error


async def test_a_reload_that_adds_sleep_to_a_running_service(world: World,
                                                             tmp_path: Path) -> None:
    await run(world, StartService("vidi"))
    services = dict(BASE_SERVICES)
    services["vidi"] = service_yaml("vidi", 4000, 40, extra=(
        "\n    sleep: {api: vllm, url: 'http://fake.test/vidi', timeout_s: 0.3, "
        "wake_timeout_s: 0.3, residual_mb: 600}"))
    base_config(tmp_path, services)
    await world.orch.apply_inventory(load_inventory(tmp_path), world)
    op = await run(world, PreparePhase(4))  # vidi is not in it: the running one can't sleep
    assert op.status == "succeeded", op.error
    step = next(s for s in op.steps if s.service == "vidi")
    assert step.action == "stop", step  # planned as the running instance is


async def test_a_wake_within_its_wake_timeout_is_not_cut_short(tmp_path: Path) -> None:
    services = dict(BASE_SERVICES)
    services["vllm"] = service_yaml("vllm", 5000, 20, extra=(
        "\n    sleep: {api: vllm, url: 'http://fake.test/vllm', timeout_s: 0.3, "
        "wake_timeout_s: 10, residual_mb: 600}"))
    base_config(tmp_path, services)
    w = World(tmp_path)
    await w.start()
    try:
        await run(w, StartService("vllm"))
        await run(w, SleepService("vllm"))
        real = w.wake

        async def slow(*args: object) -> Outcome:
            await asyncio.sleep(3.0)  # longer than a start's bound, within wake_timeout_s
            return await real(*args)  # type: ignore[arg-type]

        w.wake = slow  # type: ignore[method-assign]
        op = await run(w, StartService("vllm"))
        (step,) = op.steps
        assert op.status == "succeeded" and "started cold" not in (step.detail or ""), step
    finally:
        await w.close()


async def test_a_prewarm_gives_way_to_a_real_request(world: World) -> None:
    world.health.ready_after_s = 0.3  # slower starts: the prewarm is still starting vidi
    warm = Operation(Prewarm(2))
    prewarm = asyncio.ensure_future(world.orch.execute(warm))
    await until(lambda: world.units["vidi"].state == S.STARTING, 2, "the prewarm's start")
    op = await asyncio.wait_for(run(world, StartService("cosyvoice")), 5)
    assert op.status == "succeeded", op.error
    with contextlib.suppress(asyncio.CancelledError):  # as its background task would be
        await prewarm
    assert warm.status == "failed" and warm.error is not None
    assert warm.error["error"] == "superseded" and "cosyvoice" in warm.error["detail"]
    # what it began goes on in its unit; a request that wants it waits for it
    op = await run(world, PreparePhase(5))  # vidi and cosyvoice
    assert op.status == "succeeded", op.error
    assert world.units["vidi"].state == S.READY and "vidi" not in world.orch.followups.live()
