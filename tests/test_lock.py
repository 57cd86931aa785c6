"""The GPU lock against a real redis-server, and the in-process lock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gpu_manager.lock import LockHeld, LockLost, LockUnavailable, MemoryLock, RedisLock
from tests.support.env import RedisServer, free_port

pytestmark = pytest.mark.redis


@pytest.fixture
async def lock(redis_server: RedisServer, redis_client: Any) -> Any:
    lk = RedisLock(redis_server.url, "gpu_mutex", ttl_ms=300)
    yield lk
    await lk.close()


async def test_release_never_deletes_someone_elses_lock(lock: RedisLock, redis_client: Any) -> None:
    lease = await lock.acquire("phase-2")
    assert (await redis_client.get("gpu_mutex")).startswith("gpu-manager:phase-2:")
    # our TTL "ran out" and a legacy worker took the key
    await redis_client.delete("gpu_mutex")
    await redis_client.set("gpu_mutex", "comfyui", ex=60)
    assert await lease.release() is False
    assert await redis_client.get("gpu_mutex") == "comfyui"


async def test_renewal_keeps_the_lock_past_its_ttl(lock: RedisLock, redis_client: Any) -> None:
    lease = await lock.acquire("long-transition")
    await asyncio.sleep(1.0)  # more than three TTLs: only renewal can keep it
    assert await redis_client.get("gpu_mutex") == lease.value
    assert 0 < await redis_client.pttl("gpu_mutex") <= 300
    await lease.check()
    assert await lease.release() is True
    assert await redis_client.get("gpu_mutex") is None


async def test_fencing_refuses_a_holder_that_was_taken_over(
    lock: RedisLock, redis_client: Any, redis_server: RedisServer
) -> None:
    first = await lock.acquire("paused-holder")
    first._renewer.cancel()  # the holder is frozen (SIGSTOP): it renews nothing
    other = RedisLock(redis_server.url, "gpu_mutex", ttl_ms=300)
    try:
        second = await other.acquire("next", wait_s=2)  # gets it once the TTL expires
        assert second.fencing == first.fencing + 1
        with pytest.raises(LockLost):
            await first.check()
        await second.check()
        await second.release()
    finally:
        await other.close()


async def test_lost_lock_is_noticed_by_renewal(lock: RedisLock, redis_client: Any) -> None:
    lease = await lock.acquire("victim")
    await redis_client.set("gpu_mutex", "intruder", ex=60)
    deadline = time.monotonic() + 1
    while not lease.is_lost():
        assert time.monotonic() < deadline, "renewal did not notice within a TTL"
        await asyncio.sleep(0.01)
    with pytest.raises(LockLost):
        await lease.check()
    assert await lease.release() is False
    assert await redis_client.get("gpu_mutex") == "intruder"


async def test_legacy_holder_is_reported(lock: RedisLock, redis_client: Any) -> None:
    await redis_client.set("gpu_mutex", "comfyui", ex=60)
    with pytest.raises(LockHeld) as info:
        await lock.acquire("phase-4")
    assert info.value.holder == "comfyui" and 59_000 < (info.value.ttl_ms or 0) <= 60_000
    state = await lock.info()
    assert (state.holder, state.by_daemon) == ("comfyui", False)


async def test_waiter_gets_the_lock_soon_after_release(lock: RedisLock) -> None:
    holder = await lock.acquire("a")
    waiter = asyncio.create_task(lock.acquire("b", wait_s=5))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    released = time.monotonic()
    await holder.release()
    lease = await waiter
    handoff = time.monotonic() - released
    assert handoff < 0.05, f"hand-off took {handoff * 1000:.1f} ms"
    await lease.release()


async def test_unreachable_redis_is_unavailable_not_a_crash() -> None:
    lk = RedisLock(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(LockUnavailable, match="Redis unreachable"):
            await lk.acquire("x")
        info = await lk.info()
        assert not info.ok and info.error
    finally:
        await lk.close()


async def test_memory_lock_excludes_waits_and_fences() -> None:
    lk = MemoryLock()
    a = await lk.acquire("a")
    with pytest.raises(LockHeld, match="'a'"):
        await lk.acquire("b")
    waiter = asyncio.create_task(lk.acquire("b", wait_s=2))
    await asyncio.sleep(0.05)
    assert await a.release()
    b = await waiter
    assert b.fencing == a.fencing + 1
    with pytest.raises(LockLost):
        await a.check()
    assert await lk.force_release()
    with pytest.raises(LockLost):
        await b.check()
    assert (await lk.info()).holder is None


async def test_acquire_is_one_script_and_a_retry_of_it_takes_no_second_number(
        lock: RedisLock, redis_client: Any) -> None:
    hold = await lock.acquire("a")
    assert int(await redis_client.get("gpu_mutex:fencing")) == hold.fencing
    # the same script again with the same value (a retry whose first answer was lost on a
    # connection Redis closed): the number it already got, no second INCR
    again = await lock._acquire(keys=[lock.key, lock.fencing_key],
                                args=[hold.value, lock.ttl_ms])
    assert int(again) == hold.fencing
    assert int(await redis_client.get("gpu_mutex:fencing")) == hold.fencing
    # someone else's acquire while it is held: refused, and the number does not move
    assert int(await lock._acquire(keys=[lock.key, lock.fencing_key],
                                   args=["other", lock.ttl_ms])) == 0
    assert int(await redis_client.get("gpu_mutex:fencing")) == hold.fencing
    await hold.release()


async def test_an_acquire_cut_short_after_the_script_ran_gives_the_key_back(
        lock: RedisLock, redis_client: Any) -> None:
    # The reply is lost (a cancel, a socket timeout) after the script took the key: our own
    # value would sit there unrenewed, and our next acquire would take it for someone else's.
    real = lock._acquire

    async def lost_reply(**kw: Any) -> Any:
        await real(**kw)
        raise asyncio.CancelledError

    lock._acquire = lost_reply  # type: ignore[assignment]
    with pytest.raises(asyncio.CancelledError):
        await lock.acquire("cut-short")
    lock._acquire = real
    deadline = time.monotonic() + 2
    while await redis_client.get("gpu_mutex") is not None:
        assert time.monotonic() < deadline, "the key was not given back"
        await asyncio.sleep(0.01)
    hold = await lock.acquire("next")  # free again for us
    await hold.release()


async def test_a_lost_fencing_counter_is_taken_back_not_revoked(
        lock: RedisLock, redis_client: Any) -> None:
    # The counter evicted while the key is still ours: the check fails, the keeper gives
    # its own value back and takes the lock again; nobody is revoked, nothing stays locked.
    from gpu_manager.lock.keeper import LockKeeper

    lost: list[Any] = []
    keeper = LockKeeper(lock, on_lost=lambda *a: lost.append(a))
    claim = await keeper.hold("lease:a")
    await redis_client.delete("gpu_mutex:fencing")
    await claim.check()
    assert keeper.retakes == 1 and not lost and keeper.holders == frozenset({"lease:a"})
    assert str(await redis_client.get("gpu_mutex")).startswith("gpu-manager:")
    await keeper.drop("lease:a")
    assert await redis_client.get("gpu_mutex") is None
