"""The Redis GPU lock: acquire and fence in one Lua script, compare-and-act release and
renewal, and a renewal that doubles as the watch on the key's identity.

The key defaults to `gpu_mutex`, the key the legacy gpu_manager.py v1 takes, so the daemon
and legacy code exclude each other and each sees the other as the holder. A legacy holder's
value is its service name; ours is `gpu-manager:<what>:<random>`, unique per acquisition, so
a release or renewal can never touch a lock someone else took after our TTL ran out.

Acquire is one script (SET NX PX, then INCR of the fencing counter): with two round trips a
daemon killed between them held a lock with no fencing number, and a second acquirer could
read the counter before the first had bumped it. The renewal runs every `min(ttl/3, 1 s)`:
it is also how a deleted key (a Redis restart without persistence, an eviction, someone's
DEL) is noticed, so the owner (`keeper.LockKeeper`) can take it back within a second.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis
from loguru import logger
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from gpu_manager.lock.base import LockHeld, LockInfo, LockLost, LockUnavailable
from gpu_manager.redact import redact_url

# KEYS[1] lock key, KEYS[2] fencing counter; ARGV[1] our value, ARGV[2] ttl in ms.
# Take the key if free and return the new fencing number (0: someone holds it). Already ours
# (a retry whose first try ran but whose answer was lost): the number it got then.
ACQUIRE = """
local current = redis.call('get', KEYS[1])
if current == ARGV[1] then
  local fencing = redis.call('get', KEYS[2])
  if fencing then return tonumber(fencing) end
  return redis.call('incr', KEYS[2])
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('incr', KEYS[2])
end
return 0
"""

# KEYS[1] lock key; ARGV[1] our value. Delete only if it is still ours.
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

# KEYS[1] lock key; ARGV[1] our value, ARGV[2] ttl in ms. Extend only if it is still ours.
EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lock key, KEYS[2] fencing counter; ARGV[1] our value, ARGV[2] our fencing number.
# Still ours, and nobody has acquired (and incremented the counter) since we did.
CHECK = """
if redis.call('get', KEYS[1]) == ARGV[1] and redis.call('get', KEYS[2]) == ARGV[2] then
  return 1
end
return 0
"""

POLL_S = 0.01  # waiting for a busy lock: one acquire script every 10 ms on loopback
# The renewal's (and so the key watch's) longest period, whatever the TTL.
RENEW_MAX_S = 1.0
GIVE_BACK_S = 5.0  # the compare-and-delete of an acquire cut short


class RedisHold:
    def __init__(self, lock: RedisLock, holder: str, value: str, fencing: int) -> None:
        self._lock = lock
        self.holder = holder
        self.value = value
        self.fencing = fencing
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._expires = time.monotonic() + lock.ttl_ms / 1000
        self._renewer = asyncio.create_task(self._renew(), name="gpu-lock-renewal")

    async def _renew(self) -> None:
        lock = self._lock
        interval = min(lock.ttl_ms / 3000, RENEW_MAX_S)
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await lock._extend(keys=[lock.key], args=[self.value, lock.ttl_ms])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RedisError, or anything else: never die silently
                if not isinstance(exc, RedisError):
                    logger.opt(exception=exc).error(f"GPU lock renewal: unexpected {exc!r}")
                if time.monotonic() >= self._expires:
                    self._mark_lost(f"could not renew before the TTL ran out: {exc}")
                    return
                logger.warning(f"GPU lock renewal failed, retrying: {exc}")
                continue
            if not ok:
                self._mark_lost("the lock was deleted or taken over")
                return
            self._expires = time.monotonic() + lock.ttl_ms / 1000

    def _mark_lost(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        if self._renewer is not asyncio.current_task():
            self._renewer.cancel()  # a lost hold is never extended again
        logger.error(f"GPU lock lost ({self.holder}, fencing {self.fencing}): {reason}")

    def is_lost(self) -> bool:
        return self.lost.is_set()

    async def check(self) -> None:
        if self.lost.is_set():
            raise LockLost(self.lost_reason)
        lock = self._lock
        try:
            ok = await lock._check(keys=[lock.key, lock.fencing_key],
                                   args=[self.value, self.fencing])
        except RedisError as exc:
            raise LockUnavailable(f"Redis unreachable: {redact_url(str(exc))}") from exc
        if not ok:
            self._mark_lost("the lock is no longer ours (expired or taken over)")
            raise LockLost(self.lost_reason)

    async def release(self) -> bool:
        # Not awaited: a caller cancelled while it waited here would have its own cancel
        # swallowed with the renewer's. The renewer stops at its next await.
        self._renewer.cancel()
        lock = self._lock
        try:
            return bool(await lock._release(keys=[lock.key], args=[self.value]))
        except RedisError as exc:
            logger.warning(f"GPU lock release failed (it expires by its TTL): {exc}")
            return False


class RedisLock:
    backend = "redis"

    def __init__(self, url: str, key: str = "gpu_mutex", ttl_ms: int = 30_000) -> None:
        self.url = url
        # for messages: they reach clients, /ready and the log; the password must not
        self.safe_url = redact_url(url)
        self.key = key
        self.fencing_key = f"{key}:fencing"
        self.ttl_ms = ttl_ms
        # A pooled connection that Redis closed (a restart) fails its next command: tried
        # once more on a fresh connection. Every script here is safe to run twice.
        self.client: aioredis.Redis = aioredis.from_url(
            url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        self._acquire = self.client.register_script(ACQUIRE)
        self._giving_back: set[asyncio.Task[None]] = set()
        self._release = self.client.register_script(RELEASE)
        self._extend = self.client.register_script(EXTEND)
        self._check = self.client.register_script(CHECK)

    async def acquire(self, holder: str, wait_s: float = 0.0) -> RedisHold:
        value = f"gpu-manager:{holder}:{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fencing = int(await self._acquire(keys=[self.key, self.fencing_key],
                                                      args=[value, self.ttl_ms]))
                except BaseException:
                    # Cancelled or cut off after the script may have run: the key may now
                    # hold our value with nobody renewing it, and our own next acquire
                    # would take it for someone else's. Give it back (compare-and-delete).
                    self._give_back(value)
                    raise
                if fencing:
                    return RedisHold(self, holder, value, fencing)
                if time.monotonic() >= deadline:
                    current = await self.client.get(self.key)
                    ttl = await self.client.pttl(self.key)
                    if current is None:
                        continue  # freed between SET and GET: try again at once
                    raise LockHeld(str(current), int(ttl) if ttl >= 0 else None)
                await asyncio.sleep(POLL_S)
        except RedisError as exc:
            raise LockUnavailable(
                f"Redis unreachable at {self.safe_url}: {redact_url(str(exc))}") from exc

    def _give_back(self, value: str) -> None:
        async def release() -> None:
            try:
                async with asyncio.timeout(GIVE_BACK_S):
                    await self._release(keys=[self.key], args=[value])
            except (TimeoutError, RedisError) as exc:
                logger.warning(f"could not give back a lock acquire cut short (it expires "
                               f"by its TTL): {exc}")

        task = asyncio.get_running_loop().create_task(release(), name="gpu-lock-give-back")
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def info(self) -> LockInfo:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.get(self.key)
                pipe.pttl(self.key)
                holder, ttl = await pipe.execute()
        except RedisError as exc:
            return LockInfo(self.backend, None, None, ok=False, error=redact_url(str(exc)))
        ttl_ms = int(ttl) if holder is not None and int(ttl) >= 0 else None
        by_daemon = holder is not None and str(holder).startswith("gpu-manager:")
        return LockInfo(self.backend, holder, ttl_ms, by_daemon=by_daemon)

    async def force_release(self) -> bool:
        try:
            return bool(await self.client.delete(self.key))
        except RedisError as exc:
            raise LockUnavailable(
                f"Redis unreachable at {self.safe_url}: {redact_url(str(exc))}") from exc

    async def close(self) -> None:
        await self.client.aclose()
