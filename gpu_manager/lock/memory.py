"""The in-process GPU lock: the default when no Redis URL is configured."""

from __future__ import annotations

import asyncio
import itertools
import time

from gpu_manager.lock.base import LockHeld, LockInfo, LockLost


class MemoryHold:
    def __init__(self, lock: MemoryLock, holder: str, fencing: int) -> None:
        self._lock = lock
        self.holder = holder
        self.value = holder
        self.fencing = fencing
        self.lost = asyncio.Event()
        self.lost_reason = ""

    async def check(self) -> None:
        if self._lock._hold is not self:
            raise LockLost(self.lost_reason or
                           f"lock {self.holder!r} (fencing {self.fencing}) was released")

    def is_lost(self) -> bool:
        return self._lock._hold is not self

    async def release(self) -> bool:
        return self._lock._release(self)


class MemoryLock:
    backend = "memory"

    def __init__(self) -> None:
        self._hold: MemoryHold | None = None
        self._fencing = itertools.count(1)
        self._freed = asyncio.Condition()

    async def acquire(self, holder: str, wait_s: float = 0.0) -> MemoryHold:
        deadline = time.monotonic() + wait_s
        async with self._freed:
            while self._hold is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LockHeld(self._hold.holder, None)
                try:
                    async with asyncio.timeout(left):
                        await self._freed.wait()
                except TimeoutError:
                    continue
            self._hold = MemoryHold(self, holder, next(self._fencing))
            return self._hold

    def _release(self, hold: MemoryHold, why: str = "") -> bool:
        if self._hold is not hold:
            return False
        self._hold = None
        if why:  # taken from its holder, not given back: its owner must hear of it
            hold.lost_reason = why
            hold.lost.set()
        asyncio.get_running_loop().create_task(self._notify())
        return True

    async def _notify(self) -> None:
        async with self._freed:
            self._freed.notify_all()

    async def info(self) -> LockInfo:
        hold = self._hold
        holder = hold.holder if hold else None
        return LockInfo(self.backend, holder, None, by_daemon=hold is not None)

    async def force_release(self) -> bool:
        if self._hold is None:
            return False
        return self._release(self._hold, "force-released")

    async def close(self) -> None:
        pass
