"""One served service's requests: those in flight (a bounded number) and those waiting.

The gate is written only on the event loop, by the front door's request handlers and by the
release it holds back; nothing else writes it. A request holds a `Slot` from its admission
until its last byte is relayed (or it is cut); while any slot is held, a release of the
service waits for it (up to `drain_s`), and a release in progress keeps new requests waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False)
class Slot:
    """A request in flight. `cut()` ends it early: the relay answers a clean error."""

    gate: Gate
    task: asyncio.Task[object] | None
    started: float = field(default_factory=time.monotonic)
    cut_reason: str | None = None
    released: bool = False
    finishing: bool = False  # the last byte is on its way: nothing is cut any more

    def cut(self, why: str) -> None:
        if self.cut_reason is None and not self.released and not self.finishing:
            self.cut_reason = why
            if self.task is not None and not self.task.done():
                self.task.cancel(f"cut: {why}")  # the relay uncancels and answers cleanly

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gate.leave(self)


class Gate:
    def __init__(self, name: str, on_free: Callable[[str], None] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.name = name
        self.on_free = on_free  # called when its last request in flight ends
        # called at each change of its figures (the status shows them: its cache is told)
        self.on_change = on_change
        self.in_flight: set[Slot] = set()
        self.waiting = 0
        # Releases of the service in progress that hold new requests back.
        self.holds = 0
        self.last_request_at: float | None = None  # wall clock: the last admission
        self.last_active = time.monotonic()  # the last admission or end of a request
        self.starts = 0  # operations started by its requests (joined ones not counted)
        self.cut = 0  # requests cut by a release after drain_s
        self.answers: Counter[str] = Counter()  # status class -> count ("2xx", "5xx")
        self._changed: asyncio.Future[None] | None = None

    @property
    def busy(self) -> bool:
        return bool(self.in_flight) or self.waiting > 0

    def has_room(self, max_concurrent: int) -> bool:
        return self.holds == 0 and len(self.in_flight) < max_concurrent

    def take(self, task: asyncio.Task[object] | None) -> Slot:
        slot = Slot(self, task)
        self.in_flight.add(slot)
        self.last_request_at = time.time()
        self.last_active = time.monotonic()
        self.changed_figures()
        return slot

    def changed_figures(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def leave(self, slot: Slot) -> None:
        self.in_flight.discard(slot)
        self.last_active = time.monotonic()
        self.changed_figures()
        self.notify()
        if not self.in_flight and self.on_free is not None:
            self.on_free(self.name)

    def notify(self) -> None:
        """Wake every waiter: something they wait on may have changed."""
        fut, self._changed = self._changed, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def changed(self, timeout: float) -> None:
        """Until the next `notify()` or `timeout` (no error: the waiter looks again)."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await asyncio.shield(self._changed)
        except TimeoutError:
            pass

    async def drain(self, bound_s: float) -> tuple[int, int]:
        """Wait up to `bound_s` for the requests in flight to end; cut those left.
        Returns (how many were in flight, how many were cut)."""
        had = len(self.in_flight)
        deadline = time.monotonic() + bound_s
        while self.in_flight and (left := deadline - time.monotonic()) > 0:
            await self.changed(left)
        left_over = list(self.in_flight)
        for slot in left_over:
            slot.cut(f"{self.name} is being released (its requests had {bound_s:g}s to "
                     "finish)")
        self.cut += len(left_over)
        return had, len(left_over)
