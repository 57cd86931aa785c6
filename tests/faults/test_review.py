"""Faults a review of the hardening found, each pinned by a test (in-process, on fakes)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import docker.errors
import pytest

from gpu_manager.config import DockerService
from gpu_manager.lock.keeper import LockKeeper
from gpu_manager.orchestrator import Operation, OperationError
from gpu_manager.orchestrator.executor import PlanRun
from gpu_manager.orchestrator.ledger import ClientLease, Ledger, Releasing
from gpu_manager.planner import Plan, PreparePhase, StartService, StopService
from gpu_manager.units import DockerDriver, DockerEngine, ServiceState
from tests.faults.fakes import Fault, World
from tests.support.env import until

S = ServiceState


async def ok(w: World, req: StartService | StopService | PreparePhase) -> Operation:
    op = Operation(req)
    with contextlib.suppress(OperationError):
        await w.orch.execute(op)
    return op


async def test_a_hung_pid_read_is_never_joined_by_another(world: World) -> None:
    await ok(world, StartService("vidi"))
    driver = world.driver_of("vidi")
    world.faults.arm("vidi", "pids", Fault("hang"))
    reads = driver.pid_reads
    for _ in range(4):  # the refresher calls every second; each waits on the same read
        pids, error = await world.orch.read_pids("vidi")
        assert error is not None and "no answer" in error
        assert pids == {driver.pid}  # the last known ones, marked unreliable
    assert driver.pid_reads == reads + 1


async def test_a_retried_acquire_never_overwrites_the_granted_lease() -> None:
    ledger = Ledger()
    assert ledger.add_pending(ClientLease("a", "me", 90, 1, 100, 5))
    assert ledger.activate("lease:a") is not None
    assert not ledger.add_pending(ClientLease("a", "me", 90, 1, 100, 5))
    lease = ledger.lease("lease:a")
    assert lease is not None and lease.active  # still the granted one
    ledger.drop_pending("lease:a")
    assert ledger.lease("lease:a") is not None


async def test_same_session_twice_at_once_is_one_acquire(world: World) -> None:
    await ok(world, StartService("comfyui"))  # 12000 of 19000
    first = asyncio.ensure_future(world.leases.acquire("s", "me", 2, 1500, vram_mb=9000))
    await until(lambda: world.leases._queue, 1, "the first request queued")
    second = await world.leases.acquire("s", "me", 2, 1500, vram_mb=9000)
    # the retry joined the first: one answer for both (comfyui outranks a BACKGROUND lease)
    assert second.lease is None and second.code == "timeout"
    assert await first == second
    assert world.orch.ledger.lease("lease:s") is None  # neither left anything behind


class SlowLock:
    """A GPU lock whose acquire takes 0.5 s (Redis answering slowly)."""

    backend = "slow"

    def __init__(self) -> None:
        self.released = 0

    async def acquire(self, holder: str, wait_s: float = 0.0) -> Any:
        await asyncio.sleep(0.5)
        lock = self

        class Lease:
            value, lost_reason, fencing = "slow", "never held", 1
            lost = asyncio.Event()

            def is_lost(self) -> bool:
                return True  # every hold re-acquires, so hold() keeps the mutex 0.5 s

            async def release(self) -> bool:
                lock.released += 1
                return True

        return Lease()


async def test_a_drop_that_times_out_still_stops_counting_its_holder() -> None:
    lock = SlowLock()
    keeper = LockKeeper(lock)  # type: ignore[arg-type]
    await keeper.hold("A")
    b = asyncio.ensure_future(keeper.hold("B"))  # holds the mutex during a slow acquire
    await until(keeper._mutex.locked, 1, "B inside its slow acquire")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await keeper.drop("A")  # gives up waiting for the mutex
    await b
    await keeper.drop("B")
    assert keeper.holders == frozenset()  # A did not leak: the lock goes
    assert lock.released >= 1


async def test_a_fresh_sleep_is_not_undone_by_a_stale_reading(world: World) -> None:
    await ok(world, StartService("ollama"))
    await world.poller.next_snapshot(1)
    unit = world.units["ollama"]
    result = await unit.sleep("test")  # the unit's half only: no confirmation on the GPU yet
    assert unit.state == ServiceState.SLEEPING, result
    pids = frozenset(world.orch.ledger.view().unit_pids.get("ollama", ()))
    world.orch.ledger.released("ollama", Releasing(pids, 7600, time.monotonic(),
                                                   must_exit=False))
    await world.orch.refresh_pids()  # the latest snapshot may predate the unload
    assert unit.state == ServiceState.SLEEPING


async def test_the_owner_loop_answers_while_the_restart_gate_is_slow(world: World) -> None:
    await ok(world, PreparePhase(3))  # cosyvoice: restart on-failure
    unit = world.units["cosyvoice"]
    gate_entered = asyncio.Event()

    async def slow_gate(name: str) -> bool:
        gate_entered.set()
        await asyncio.sleep(5)
        return True

    unit._restart_gate = slow_gate
    world.driver_of("cosyvoice").crash()
    await asyncio.wait_for(gate_entered.wait(), 3)
    t0 = time.monotonic()
    result = await unit.stop("operator")  # the loop is not stuck behind the gate
    assert result.ok and time.monotonic() - t0 < 0.5
    assert unit.state in (S.STOPPED, S.FAILED)


async def test_start_of_a_failed_unit_whose_process_lingers_restarts_it(world: World) -> None:
    await ok(world, StartService("vidi"))
    old = world.driver_of("vidi")
    old_pid = old.pid
    world.faults.arm("vidi", "stop", Fault("raise"))
    op = await ok(world, StopService("vidi"))
    assert op.status == "failed" and world.units["vidi"].state == S.FAILED and old.alive
    op = await ok(world, StartService("vidi"))
    assert op.status == "succeeded", op.error
    assert [(s.action, s.service) for s in op.steps] == [("stop", "vidi"), ("start", "vidi")]
    assert world.units["vidi"].state == S.READY
    assert world.driver_of("vidi").pid != old_pid and world.gpu.oom == []


class FakeContainer:
    def __init__(self) -> None:
        self.id, self.status, self.started = "c0ffee", "created", False

    def start(self) -> None:
        self.started = True


class FakeClient:
    """Looks up nothing, and creates slowly (a pull, a slow engine)."""

    def __init__(self) -> None:
        self.creating = threading.Event()
        self.go = threading.Event()
        self.container = FakeContainer()
        self.containers = self

    def get(self, name: str) -> Any:
        raise docker.errors.NotFound("no such container")

    def create(self, image: str, **kwargs: Any) -> FakeContainer:
        self.creating.set()
        self.go.wait(10)
        return self.container


async def test_an_abandoned_docker_start_never_starts_the_container() -> None:
    engine = DockerEngine()
    client = FakeClient()
    engine._connect = lambda: client  # type: ignore[method-assign]
    cfg = DockerService.model_validate({"type": "docker", "container": "gmt-slow",
                                        "image": "x", "vram_mb": 1})
    driver = DockerDriver("slow", cfg, engine)
    start = asyncio.ensure_future(driver.start())
    await asyncio.to_thread(client.creating.wait, 5)
    start.cancel()  # the unit's start deadline
    with pytest.raises(asyncio.CancelledError):
        await start
    client.go.set()  # the create finishes after we gave up
    await asyncio.to_thread(engine._pool.shutdown, True)  # the launch thread has finished
    assert not client.container.started, "a start we abandoned ran the container"
    assert not driver.running()
    engine.close()


class YieldingLease:
    """The Redis lease's check is a network round trip: it yields to the loop."""

    holder, fencing = "test", 1

    async def check(self) -> None:
        await asyncio.sleep(0.01)

    def is_lost(self) -> bool:
        return False

    async def release(self) -> bool:
        return True


async def test_two_starts_never_both_take_the_same_free_memory(world: World) -> None:
    # The planner thought both fit; then a desktop took 13000 MB: 6000 MB are left above
    # the reserve, room for one 4000 MB start, not two. The room check and the claim are
    # one step, so the second start sees the first one's claim despite the yielding check.
    world.gpu.foreign_mb = 13000
    await world.poller.next_snapshot(1)
    plan = Plan(StartService("vidi"), (), 0, 0, 0)
    run = PlanRun(world.orch, Operation(StartService("vidi")), plan,
                  YieldingLease())  # type: ignore[arg-type]
    run._began = 0.0
    results = await asyncio.gather(run.start("vidi", 4000), run.start("cosyvoice", 4000),
                                   return_exceptions=True)
    failed = [r for r in results if isinstance(r, OperationError)]
    assert len(failed) == 1, results
    assert failed[0].code == "reclaim_timeout"
    assert world.gpu.oom == []
