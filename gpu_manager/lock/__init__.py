"""The GPU lock: in-process by default, Redis (`GPU_MANAGER_REDIS_URL`) to share it."""

from __future__ import annotations

from typing import Any

from gpu_manager.lock.base import (
    GpuLock,
    LockHeld,
    LockHold,
    LockInfo,
    LockLost,
    LockUnavailable,
)
from gpu_manager.lock.memory import MemoryLock

# redis-py costs ~0.3 s to import: only a daemon configured with Redis pays for it.


def make_lock(redis_url: str | None, key: str = "gpu_mutex", ttl_ms: int = 30_000) -> GpuLock:
    if redis_url:
        from gpu_manager.lock.redis import RedisLock  # noqa: PLC0415

        return RedisLock(redis_url, key, ttl_ms)
    return MemoryLock()


def __getattr__(name: str) -> Any:
    if name == "RedisLock":
        from gpu_manager.lock.redis import RedisLock  # noqa: PLC0415

        return RedisLock
    raise AttributeError(name)


__all__ = [
    "GpuLock",
    "LockHeld",
    "LockHold",
    "LockInfo",
    "LockLost",
    "LockUnavailable",
    "MemoryLock",
    "RedisLock",
    "make_lock",
]
