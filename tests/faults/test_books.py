"""The books never lie, in-process: the GPU lock's owner through loss, bounded and idempotent
acquires, and the unit's inbox. Real daemon parts on the fakes (tests/faults/fakes.py), where
a race must be reproduced deterministically; the real-process side is tests/test_books.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from gpu_manager.lock import LockLost, LockUnavailable, MemoryLock
from gpu_manager.lock.keeper import LockKeeper
from gpu_manager.orchestrator import Operation, OperationError
from gpu_manager.orchestrator.cards import past_residual
from gpu_manager.orchestrator.ledger import ClientLease, Ledger
from gpu_manager.planner import PreparePhase, StartService
from gpu_manager.units import ServiceState
from gpu_manager.units.messages import EnsureReady
from tests.faults.fakes import Fault, World
from tests.support.env import until

S = ServiceState


class SlowReleaseLock(MemoryLock):
    """An in-process lock whose release takes a while (a Redis round trip under load)."""

    def __init__(self) -> None:
        super().__init__()
        self.releases = 0

    async def acquire(self, holder: str, wait_s: float = 0.0) -> Any:
        hold = await super().acquire(holder, wait_s)
        real = hold.release

        async def slow() -> bool:
            await asyncio.sleep(0.2)
            self.releases += 1
            return await real()

        hold.release = slow  # type: ignore[method-assign]
        return hold


async def test_a_release_cancelled_halfway_still_releases() -> None:
    # The bug: a superseded prewarm's drop was cancelled between clearing the holder and
    # the release call, and the key stayed held (nobody holding it) until its TTL.
    lock = SlowReleaseLock()
    keeper = LockKeeper(lock)
    await keeper.hold("Prewarm:3:x")
    drop = asyncio.ensure_future(keeper.drop("Prewarm:3:x"))
    await asyncio.sleep(0.05)  # inside the slow release
    drop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drop
    await until(lambda: lock._hold is None, 2, "the release to finish on its own")
    assert lock.releases == 1 and keeper.holders == frozenset()
    again = await keeper.hold("next")  # nobody is left waiting on a stale key
    await again.check()


async def test_a_lost_lock_is_taken_back_and_its_holders_go_on() -> None:
    lock = MemoryLock()
    retaken: list[str] = []
    keeper = LockKeeper(lock, on_retaken=retaken.append)
    watch = asyncio.ensure_future(keeper.watch())
    try:
        claim = await keeper.hold("lease:a")
        first = claim.fencing
        await lock.force_release()  # the key is gone (a Redis restart, an eviction)
        await until(lambda: keeper.retakes == 1, 2, "the keeper to take it back")
        await claim.check()  # the holder goes on, on a new fencing number
        assert claim.fencing is not None and first is not None and claim.fencing > first
        assert retaken and keeper.revocations == 0
    finally:
        watch.cancel()


async def test_a_lock_taken_by_someone_else_revokes_every_holder() -> None:
    lock = MemoryLock()
    lost: list[tuple[list[str], str, str | None]] = []
    keeper = LockKeeper(lock, on_lost=lambda *a: lost.append(a))
    watch = asyncio.ensure_future(keeper.watch())
    try:
        op = await keeper.hold("StartService:comfyui:1")
        await keeper.hold("lease:a")
        await lock.force_release()
        await lock.acquire("comfyui")  # a legacy worker's SET NX, before any retake
        await until(lambda: lost, 2, "the keeper to revoke its holders")
        labels, why, holder = lost[0]
        assert labels == ["StartService:comfyui:1", "lease:a"] and holder == "comfyui"
        assert "held by 'comfyui'" in why
        with pytest.raises(LockLost, match="comfyui"):
            await op.check()  # the operation stops before its next start
        assert keeper.holders == frozenset() and keeper.revocations == 1
        assert (await lock.info()).holder == "comfyui"  # ours was never taken back over it
    finally:
        watch.cancel()


class FlakyLock(MemoryLock):
    """A lock whose backend can be made unreachable."""

    down = False

    async def acquire(self, holder: str, wait_s: float = 0.0) -> Any:
        if self.down:
            raise LockUnavailable("backend down")
        return await super().acquire(holder, wait_s)


async def test_while_the_backend_is_unreachable_no_start_goes_ahead() -> None:
    lock = FlakyLock()
    keeper = LockKeeper(lock)
    watch = asyncio.ensure_future(keeper.watch())
    try:
        claim = await keeper.hold("op")
        lock.down = True
        await lock.force_release()
        with pytest.raises(LockUnavailable):
            await claim.check()  # in doubt: nobody can say who holds it
        assert keeper.doubt is not None
        lock.down = False
        await until(lambda: keeper.retakes == 1, 3, "the retake once it answers")
        await claim.check()
        assert keeper.doubt is None
    finally:
        watch.cancel()


async def test_a_stolen_lock_loses_the_leases_and_stops_the_operation(world: World) -> None:
    granted = await world.leases.acquire("a", "ml", 1, 1000, vram_mb=4000, ttl_s=5)
    assert granted.lease is not None
    events: list[Any] = []
    world.bus.on(events.append)
    # 4000 + 4000 + 12000 do not fit in 19000: comfyui's start waits for cosyvoice's stop,
    # which takes a while
    await world.orch.execute(Operation(PreparePhase(3)))
    world.faults.arm("cosyvoice", "stop", Fault("late", delay_s=0.4))
    op = Operation(StartService("comfyui"))
    task = asyncio.ensure_future(world.orch.execute(op))
    await until(lambda: world.units["cosyvoice"].state == S.STOPPING, 2, "the stop step")
    await world.lock.force_release()
    await world.lock.acquire("comfyui-legacy")  # a legacy worker takes the key meanwhile
    with pytest.raises(LockLost):
        await task
    assert world.units["comfyui"].state == S.STOPPED  # never started without the lock
    assert world.leases.get("a") is None and world.leases.renew("a") is None
    lost = world.leases.lost("a")
    assert lost is not None and "comfyui-legacy" in lost.reason
    assert any(e.kind == "lease" and e.data.get("status") == "lost" for e in events)
    assert any(e.kind == "lock" and e.data.get("status") == "lost" for e in events)
    assert world.orch.keeper.holders == frozenset()


async def test_an_acquire_answers_within_its_timeout_behind_a_long_start(world: World) -> None:
    # comfyui's start takes 0.45 s (its timeout is 0.5 s); an acquire with a 100 ms timeout
    # used to wait for the serial lane and the whole plan, then be granted to nobody
    world.health.ready_after_s = 0.45
    start = asyncio.ensure_future(world.orch.execute(Operation(StartService("comfyui"))))
    await until(lambda: world.units["comfyui"].state == S.STARTING, 1, "the start")
    t0 = time.monotonic()
    res = await world.leases.acquire("late", "ml", 1, 100, vram_mb=1000)
    took = time.monotonic() - t0
    assert res.lease is None and res.code == "timeout", res
    assert took < 0.1 + 0.2, f"answered after {took:.2f}s for a 100 ms timeout"
    assert world.orch.ledger.lease("lease:late") is None  # nothing left held for nobody
    assert "lease:late" not in world.orch.keeper.holders
    await start


async def test_a_release_cancels_the_acquire_still_in_flight(world: World) -> None:
    await world.orch.execute(Operation(StartService("comfyui")))  # 12000 of 19000
    pending = asyncio.ensure_future(world.leases.acquire("s", "ml", 2, 5000, vram_mb=9000))
    await until(lambda: world.leases.waiting == ["s"], 1, "the acquire waiting for room")
    assert await world.leases.release("s") is None  # no lease: the acquire is cancelled
    res = await asyncio.wait_for(pending, 1)
    assert res.lease is None and res.code == "cancelled" and "before it was granted" in (
        res.error or "")
    assert world.orch.ledger.lease("lease:s") is None


async def test_a_message_whose_caller_gave_up_is_not_acted_on(world: World) -> None:
    unit = world.units["vidi"]
    await world.orch.execute(Operation(StartService("vidi")))
    world.faults.arm("vidi", "stop", Fault("late", delay_s=0.45))  # (its bound: 0.5 s)
    stopping = asyncio.ensure_future(unit.stop("test"))
    await until(lambda: unit.handling == "Stop", 1, "the slow stop")
    # a start asked while the loop is busy, whose caller gives up at once
    gave_up = await unit._ask(0.0, EnsureReady)
    assert gave_up.unknown and not gave_up.ok
    await stopping
    await asyncio.sleep(0.2)
    assert unit.state == S.STOPPED  # the abandoned start was dropped, not run for nobody
    assert not world.driver_of("vidi").alive


def test_a_residual_is_per_card() -> None:
    # two cards holding 800 MB each, residual 1000 per card: asleep (the sum, 1600 MB, is
    # not what the residual bounds)
    assert past_residual({0: 800, 1: 800}, 1000) == (False, 1600)
    assert past_residual({0: 800, 1: 1200}, 1000) == (True, 2000)
    assert past_residual(None, 1000) == (None, None)


async def test_an_operation_waits_its_turn_for_a_bounded_time(world: World) -> None:
    world.orch.queue_wait_s = 0.2
    world.health.ready_after_s = 0.45
    first = asyncio.ensure_future(world.orch.execute(Operation(StartService("comfyui"))))
    await until(lambda: world.orch.busy, 1, "the first transition")
    op = Operation(StartService("vidi"))
    t0 = time.monotonic()
    with pytest.raises(OperationError) as info:
        await world.orch.execute(op)
    assert info.value.code == "queue_timeout" and time.monotonic() - t0 < 0.5
    assert op.status == "failed" and op.error is not None
    await first


async def test_identical_requests_join_the_one_in_flight(world: World) -> None:
    world.health.ready_after_s = 0.3
    a, task_a, joined_a = world.orch.submit(PreparePhase(3))
    b, task_b, joined_b = world.orch.submit(PreparePhase(3))
    _, _, joined_c = world.orch.submit(StartService("vidi"))
    d, _, joined_d = world.orch.submit(PreparePhase(3))  # not behind a different one: queued
    assert (joined_a, joined_b, joined_c, joined_d) == (False, True, False, False)
    assert b is a and task_b is task_a and a.joined == 1 and d is not a
    await asyncio.gather(task_a, *world.orch.in_flight(), return_exceptions=True)
    assert a.status == "succeeded"


def test_a_grant_no_caller_received_expires_unless_one_got_it() -> None:
    ledger = Ledger()
    for sid in ("gone", "retried"):
        ledger.add_pending(ClientLease(sid, "ml", 90, 1, 1000, 60))
        ledger.activate(f"lease:{sid}")
    ledger.unclaimed("lease:gone", 5)  # its one caller had left
    ledger.unclaimed("lease:retried", 5)  # the first caller had left...
    ledger.renew("lease:retried")  # ...and a retry that joined got it
    ledger.unclaimed("lease:retried", 5)  # (order does not matter once it is claimed)
    gone, kept = ledger.lease("lease:gone"), ledger.lease("lease:retried")
    assert gone is not None and gone.expires - time.monotonic() <= 5.0
    assert kept is not None and kept.claimed and kept.expires - time.monotonic() > 50
