"""`/fleet/acquire` by session: a retry joins the placement in flight, and a grant no caller
received is released at its host.

A client whose HTTP call timed out asks again with the same session id (GPUClient does);
placed again, the same session could be granted on a second host while the first grant
waits for nobody. So a session's placement runs once: callers join it while it runs and
for a short while after (they get its answer). The host sees the fleet daemon's connection,
not the client's, so it cannot tell a grant nobody received: the last caller to leave (or
the placement, finishing after every caller left) releases such a grant at its host.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from loguru import logger

from gpu_manager.fleet.runner import Fleet, Placed

KEEP_S = 10.0  # a retry this long after the answer still gets it


@dataclass
class _Entry:
    task: asyncio.Task[Placed]
    callers: int = 0
    received: bool = False
    settled: bool = False  # a grant nobody got has been released (or is being)
    done_at: float | None = None


def granted(p: Placed) -> bool:
    r = p.reply
    return r is not None and r.ok and isinstance(r.body, dict) and bool(r.body.get("success"))


class FleetAcquires:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._entries: dict[str, _Entry] = {}
        self._releases: set[asyncio.Task[None]] = set()

    async def acquire(self, session_id: str, start: Callable[[], Coroutine[Any, Any, Placed]],
                      connected: Callable[[], Awaitable[bool]]) -> Placed:
        self._prune()
        e = self._entries.get(session_id)
        if e is None:
            e = _Entry(asyncio.create_task(start(), name=f"fleet-acquire-{session_id}"))
            self._entries[session_id] = e
            e.task.add_done_callback(functools.partial(self._on_done, session_id, e))
        e.callers += 1
        got = False
        try:
            placed = await asyncio.shield(e.task)
            got = await connected()
            return placed
        finally:
            e.callers -= 1
            e.received = e.received or got
            if e.callers == 0 and e.task.done():
                self._settle(session_id, e)

    def _on_done(self, session_id: str, e: _Entry, _task: asyncio.Task[Placed]) -> None:
        e.done_at = time.monotonic()
        failed = e.task.cancelled() or e.task.exception() is not None  # (retrieved here)
        if (failed or not granted(e.task.result())) and self._entries.get(session_id) is e:
            del self._entries[session_id]  # only a grant is kept for retries; a no is not
        if e.callers == 0:  # every caller left before the answer
            self._settle(session_id, e)

    def _settle(self, session_id: str, e: _Entry) -> None:
        if e.settled or e.received or e.task.cancelled() or e.task.exception() is not None:
            return
        placed = e.task.result()
        if not granted(placed):
            return
        e.settled = True
        self._entries.pop(session_id, None)  # a retry now places afresh
        logger.warning(f"fleet lease {session_id}: granted on {placed.host.name} after its "
                       "client left; releasing it there")
        task = asyncio.create_task(self._release(placed, session_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, placed: Placed, session_id: str) -> None:
        reply = await self.fleet.peers.call(placed.host, "POST", "/gpu/release",
                                            json={"session_id": session_id})
        if not reply.ok:  # its TTL ends it
            logger.warning(f"fleet lease {session_id}: release on {placed.host.name} failed: "
                           f"{reply.error or reply.status}")

    def _prune(self) -> None:
        now = time.monotonic()
        for sid, e in list(self._entries.items()):
            if e.done_at is not None and e.callers == 0 and now - e.done_at > KEEP_S:
                del self._entries[sid]

    async def aclose(self) -> None:
        for e in self._entries.values():
            e.task.cancel()
        if self._releases:
            await asyncio.wait(self._releases, timeout=self.fleet.peers.timeout_s)
