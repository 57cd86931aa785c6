"""The GPU lock's one owner in the daemon.

Transitions need the lock while they run; client leases need it while they are held, so that
legacy code taking `gpu_mutex` sees the GPU as owned. The keeper takes the lock once and keeps
it while any holder (a label: an operation, a client lease) is registered.

Loss is the keeper's event, not each holder's surprise. When the backend shows the key is no
longer ours (deleted by a Redis restart without persistence, evicted, expired while Redis was
unreachable, taken, force-released) the keeper at once tries to take it back, with a new
fencing number: if that works, every holder goes on. If someone else holds it, every holder
is revoked: client leases are told `lost` (`on_lost`), operations fail their next check
(before their next start), and it is counted. While the backend cannot be reached nobody can
know who holds the key: checks answer `LockUnavailable` (no start goes ahead on a guess) and
the keeper tries again every `RETRY_S` until the backend answers.

Releases run as tasks of their own, shielded from their callers: a caller cancelled halfway
(a prewarm that gave way, a client that gave up) used to leave the key held with no holder
until its TTL ran out. `watch()` also releases a hold nobody holds, so that cannot last.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger

from gpu_manager.aio import retrieve, wait_event
from gpu_manager.lock.base import GpuLock, LockHeld, LockHold, LockLost, LockUnavailable

RETRY_S = 0.5  # while the backend is unreachable, how often the keeper tries again
IO_S = 5.0  # one call to the backend (acquire, release) from the keeper
REVOKED_KEPT = 1000  # labels whose revocation is remembered for their next check

# (revoked labels, why, who holds the lock now or None)
LostSink = Callable[[list[str], str, str | None], None]


class Claim:
    """A holder's handle on the daemon's lock: what a plan checks before each start."""

    def __init__(self, keeper: LockKeeper, label: str) -> None:
        self._keeper = keeper
        self.label = label

    @property
    def fencing(self) -> int | None:
        hold = self._keeper.current
        return hold.fencing if hold is not None else None

    def is_lost(self) -> bool:
        """Known lost or in doubt already (no I/O): the next check decides which."""
        k = self._keeper
        hold = k.current
        return self.label in k.revoked or hold is None or hold.is_lost()

    async def check(self) -> None:
        """Return if the daemon owns the lock now for this holder (the fencing check); raise
        LockLost when it was revoked, LockUnavailable while nobody can tell."""
        k = self._keeper
        for attempt in range(2):
            why = k.revoked.get(self.label)
            if why is not None:
                raise LockLost(why)
            if self.label not in k.holders:
                raise LockLost(f"{self.label} no longer holds the GPU lock")
            hold = k.current
            if hold is not None and not hold.is_lost():
                try:
                    await hold.check()
                    return
                except LockLost:
                    pass  # gone under us: take it back, or learn who has it
            if attempt == 0:
                await k.recover()
        why = k.revoked.get(self.label)
        if why is not None:
            raise LockLost(why)
        raise LockUnavailable(k.doubt or "the GPU lock's owner cannot be confirmed")


class LockKeeper:
    def __init__(self, lock: GpuLock, on_change: Callable[[], None] | None = None,
                 on_lost: LostSink | None = None,
                 on_retaken: Callable[[str], None] | None = None) -> None:
        self.lock = lock
        self._hold: LockHold | None = None
        self._holders: set[str] = set()
        # Revoked holders, told at their next check; dropped when they drop.
        self.revoked: OrderedDict[str, str] = OrderedDict()
        self._mutex = asyncio.Lock()
        self._on_change = on_change or (lambda: None)
        self._on_lost = on_lost or (lambda labels, why, holder: None)
        self._on_retaken = on_retaken or (lambda why: None)
        self._label = "gpu-manager"  # the label the lock is (re)taken under
        self._tasks: set[asyncio.Task[None]] = set()
        self.retakes = 0  # losses taken back before anyone else got the key
        self.revocations = 0  # losses to someone else (or to an operator's force release)
        self.doubt: str | None = None  # why nobody can tell who holds it now
        self._last_value: str | None = None  # the value of the hold released last
        self._changed = asyncio.Event()  # a hold taken: the watch starts watching it now

    @property
    def holders(self) -> frozenset[str]:
        return frozenset(self._holders)

    @property
    def current(self) -> LockHold | None:
        return self._hold

    def owns(self, value: str | None) -> bool:
        """Whether the backend's value `value` is this daemon's current hold."""
        hold = self._hold
        return hold is not None and value is not None and value == hold.value

    def owned(self, value: str | None) -> bool:
        """Whether `value` was the hold this daemon released last (a read of the backend
        from before the release)."""
        return value is not None and value == self._last_value

    async def hold(self, label: str, wait_s: float = 0.0) -> Claim:
        """Register `label` as a holder; take the lock if the daemon does not hold it yet
        (raises LockHeld or LockUnavailable, and registers nothing, when it cannot)."""
        async with self._mutex:
            self.revoked.pop(label, None)
            if self._hold is not None and self._hold.is_lost():
                await self._recover_locked()
            if self._hold is None:
                if not self._holders:
                    self._label = label
                self._hold = await self.lock.acquire(label, wait_s)
                if self._holders:  # they were in doubt; this acquire took it back for them
                    self._retaken(self.doubt or "in doubt")
                self.doubt = None
                self._on_change()
            self._holders.add(label)
            self._changed.set()
            return Claim(self, label)

    async def drop(self, label: str) -> None:
        # Discarded before anything that can wait: a drop whose caller gives up must still
        # stop counting this holder. The release itself is a task of its own.
        self._holders.discard(label)
        self.revoked.pop(label, None)
        await self._shielded(self._release_if_idle())

    async def release_all(self) -> None:
        self._holders.clear()
        await self._shielded(self._release_if_idle())

    async def revoke(self, why: str) -> list[str]:
        """An operator's force release: every holder is told the lock is gone, and it is
        released. Returns the labels revoked."""
        async with self._mutex:
            labels = self._revoke_locked(why, None)
        await self._shielded(self._release_if_idle())
        return labels

    async def recover(self) -> None:
        """Settle a lost (or unconfirmed) hold: take it back, or revoke its holders."""
        async with self._mutex:
            await self._recover_locked()

    async def watch(self) -> None:
        """Run by the daemon's supervisor: react to a loss as soon as the backend shows it,
        keep retrying while it is unreachable, and release a hold nobody holds."""
        while True:
            hold = self._hold
            self._changed.clear()
            if hold is not None and not hold.is_lost() and self._holders:
                await self._lost_or_changed(hold)
            elif self._holders:  # in doubt: try again in a while
                await asyncio.sleep(RETRY_S)
            else:  # nothing held: until something is
                await wait_event(self._changed, RETRY_S)
            if self._hold is not None and not self._holders:
                await self._shielded(self._release_if_idle())
            elif self._holders and (self._hold is None or self._hold.is_lost()):
                await self.recover()

    async def _lost_or_changed(self, hold: LockHold) -> None:
        """Until `hold` is lost, or the keeper's hold changes (released, replaced), or
        RETRY_S."""
        waits = [asyncio.ensure_future(hold.lost.wait()),
                 asyncio.ensure_future(self._changed.wait())]
        try:
            await asyncio.wait(waits, timeout=RETRY_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def close(self, timeout: float = IO_S) -> None:
        """Wait (bounded) for the releases still running."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    # -- under the mutex ----------------------------------------------------------------------
    async def _recover_locked(self) -> None:
        hold = self._hold
        if hold is not None and not hold.is_lost():
            return
        self._hold = None
        reason = (hold.lost_reason or "lost") if hold is not None else (self.doubt or "lost")
        if hold is not None:
            self._last_value = hold.value
            # Given back if the key still holds its value (a lost fencing counter, say):
            # else our own old value would read as someone else's below.
            try:
                async with asyncio.timeout(IO_S):
                    await hold.release()
            except TimeoutError:
                pass
        if not self._holders:
            return
        # in doubt until the retake below says otherwise (also if this is cancelled)
        self.doubt = f"the GPU lock was lost ({reason}); taking it back"
        try:
            async with asyncio.timeout(IO_S):
                fresh = await self.lock.acquire(self._label, 0.0)
        except LockHeld as exc:
            self._revoke_locked(f"the GPU lock was lost ({reason}) and is now held by "
                                f"{exc.holder!r}", exc.holder)
            return
        except (LockUnavailable, TimeoutError) as exc:
            why = str(exc) or f"no answer within {IO_S:g}s"
            if self.doubt is None:
                logger.error(f"GPU lock lost ({reason}); it cannot be taken back now: {why}")
            self.doubt = f"the GPU lock was lost ({reason}) and cannot be confirmed: {why}"
            return
        self._hold = fresh
        self._changed.set()
        self._retaken(reason)
        self._on_change()

    def _retaken(self, reason: str) -> None:
        self.doubt = None
        self.retakes += 1
        logger.warning(f"GPU lock lost ({reason}) and taken back (fencing "
                       f"{self._hold.fencing if self._hold else '?'}) for "
                       f"{', '.join(sorted(self._holders))}")
        self._on_retaken(reason)

    def _revoke_locked(self, why: str, holder: str | None) -> list[str]:
        labels = sorted(self._holders)
        self._holders.clear()
        self.doubt = None
        if labels:
            for label in labels:
                self.revoked[label] = why
            while len(self.revoked) > REVOKED_KEPT:
                self.revoked.popitem(last=False)
            self.revocations += 1
            logger.error(f"GPU lock: {why}; revoked for {', '.join(labels)}")
            self._on_lost(labels, why, holder)
        self._on_change()
        return labels

    async def _release_if_idle(self) -> None:
        async with self._mutex:
            if self._holders or self._hold is None:
                return
            hold, self._hold = self._hold, None
            self._last_value = hold.value
            self._changed.set()
            try:
                async with asyncio.timeout(IO_S):
                    await hold.release()
            except TimeoutError:
                logger.error(f"releasing the GPU lock got no answer within {IO_S:g}s; "
                             "it expires by its TTL")
            finally:
                self._on_change()

    async def _shielded(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(retrieve)
        await asyncio.shield(task)


__all__ = ["Claim", "LockKeeper", "LockLost"]
