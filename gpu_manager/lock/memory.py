"""The in-process GPU lock: the default when no Redis URL is configured."""

from __future__ import annotations

import asyncio
import itertools
import time

from gpu_manager.lock.base import LockHeld, LockInfo, LockLost


class MemoryLease:
    def __init__(self, lock: MemoryLock, holder: str, fencing: int) -> None:
        self._lock = lock
        self.holder = holder
        self.fencing = fencing

    async def check(self) -> None:
        if self._lock._lease is not self:
            raise LockLost(f"lock {self.holder!r} (fencing {self.fencing}) was released")

    def is_lost(self) -> bool:
        return self._lock._lease is not self

    async def release(self) -> bool:
        return self._lock._release(self)


class MemoryLock:
    backend = "memory"

    def __init__(self) -> None:
        self._lease: MemoryLease | None = None
        self._since = 0.0
        self._fencing = itertools.count(1)
        self._freed = asyncio.Condition()

    async def acquire(self, holder: str, wait_s: float = 0.0) -> MemoryLease:
        deadline = time.monotonic() + wait_s
        async with self._freed:
            while self._lease is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockHeld(self._lease.holder, None)
                try:
                    async with asyncio.timeout(left):
                        await self._freed.wait()
                except TimeoutError:
                    continue
            self._lease = MemoryLease(self, holder, next(self._fencing))
            self._since = time.monotonic()
            return self._lease

    def _release(self, lease: MemoryLease) -> bool:
        if self._lease is not lease:
            return False
        self._lease = None
        asyncio.get_running_loop().create_task(self._notify())
        return True

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    async def info(self) -> LockInfo:
        lease = self._lease
        holder = lease.holder if lease else None
        return LockInfo(self.backend, holder, None, by_daemon=lease is not None)

    async def force_release(self) -> bool:
        if self._lease is None:
            return False
        return self._release(self._lease)

    async def close(self) -> None:
        pass
