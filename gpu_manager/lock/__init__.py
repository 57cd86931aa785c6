"""The GPU lock: in-process by default, Redis (`GPU_MANAGER_REDIS_URL`) to share it."""

from __future__ import annotations

from gpu_manager.lock.base import GpuLock, Lease, LockHeld, LockInfo, LockLost, LockUnavailable
from gpu_manager.lock.memory import MemoryLock
from gpu_manager.lock.redis import RedisLock


def make_lock(redis_url: str | None, key: str = "gpu_mutex", ttl_ms: int = 30_000) -> GpuLock:
    if redis_url:
        return RedisLock(redis_url, key, ttl_ms)
    return MemoryLock()


__all__ = [
    "GpuLock",
    "Lease",
    "LockHeld",
    "LockInfo",
    "LockLost",
    "LockUnavailable",
    "MemoryLock",
    "RedisLock",
    "make_lock",
]
