"""Hold the GPU lock for the daemon as long as anything in it needs the GPU.

Transitions need the lock while they run; client leases need it while they are held, so that
legacy code taking `gpu_mutex` sees the GPU as owned. The keeper takes the lock once and keeps
it while any holder is registered (a refcount), re-acquiring if it was lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gpu_manager.lock.base import GpuLock, Lease


class LockKeeper:
    def __init__(self, lock: GpuLock, on_change: Callable[[], None] | None = None) -> None:
        self.lock = lock
        self._lease: Lease | None = None
        self._holders: set[str] = set()
        self._mutex = asyncio.Lock()
        self._on_change = on_change or (lambda: None)

    @property
    def holders(self) -> frozenset[str]:
        return frozenset(self._holders)

    async def hold(self, label: str, wait_s: float = 0.0) -> Lease:
        """Register `label` as a holder; take the lock if the daemon does not hold it yet."""
        async with self._mutex:
            if self._lease is not None and self._lease.is_lost():
                self._lease = None  # stale: everyone holding it learns at their next check
            if self._lease is None:
                self._lease = await self.lock.acquire(label, wait_s)
                self._on_change()
            self._holders.add(label)
            return self._lease

    async def drop(self, label: str) -> None:
        # Discarded before waiting for the mutex: a drop whose caller gives up while another
        # holder's slow acquire has the mutex must still stop counting this holder, or the
        # lock would be kept (and renewed) for good.
        self._holders.discard(label)
        async with self._mutex:
            if not self._holders and self._lease is not None:
                lease, self._lease = self._lease, None
                await lease.release()
                self._on_change()

    async def release_all(self) -> None:
        async with self._mutex:
            self._holders.clear()
            if self._lease is not None:
                lease, self._lease = self._lease, None
                await lease.release()
                self._on_change()


__all__ = ["LockKeeper"]
