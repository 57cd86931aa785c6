"""The GPU lock interface: in-process or Redis, the same contract.

A transition holds the lock from planning to the last start, so the VRAM its stops free is
kept for its own starts. Each acquisition is a `LockHold` with a fencing number;
`LockHold.check()` is called before every start and raises `LockLost` once anyone else could
have acquired the lock since. (A `LockHold` is the daemon's hold of the GPU lock; a client's
VRAM lease is `orchestrator.ledger.ClientLease`, a different thing.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class LockInfo:
    backend: str
    holder: str | None
    ttl_ms: int | None  # None: no expiry (or not held)
    ok: bool = True
    error: str | None = None
    by_daemon: bool = False  # held by a gpu-manager (this daemon or another)


class LockHeld(Exception):
    def __init__(self, holder: str, ttl_ms: int | None) -> None:
        self.holder = holder
        self.ttl_ms = ttl_ms
        ttl = f", {ttl_ms / 1000:.1f}s left" if ttl_ms is not None and ttl_ms >= 0 else ""
        super().__init__(f"the GPU lock is held by {holder!r}{ttl}")


class LockUnavailable(Exception):
    """The lock backend cannot be reached."""


class LockLost(Exception):
    """We no longer own the lock (expired, force-released or taken over)."""


class LockHold(Protocol):
    """One acquisition of the GPU lock. `lost` is set once the backend shows the lock is no
    longer this acquisition's (deleted, expired, taken over, force-released)."""

    holder: str
    value: str  # what the backend stores for it (the key's value in Redis)
    fencing: int
    lost: asyncio.Event
    lost_reason: str

    async def check(self) -> None:
        """Raise LockLost unless we still own the lock and nobody acquired it after us."""
        ...

    def is_lost(self) -> bool:
        """Known lost already (no I/O)."""
        ...

    async def release(self) -> bool: ...


class GpuLock(Protocol):
    backend: str

    async def acquire(self, holder: str, wait_s: float = 0.0) -> LockHold:
        """Take the lock, waiting up to `wait_s`; raises LockHeld or LockUnavailable."""
        ...

    async def info(self) -> LockInfo: ...

    async def force_release(self) -> bool:
        """Delete the lock whoever holds it (operator action)."""
        ...

    async def close(self) -> None: ...
