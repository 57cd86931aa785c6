"""State-change events: every transition of every unit, timestamped, with its reason.

One bus fans events out to subscribers (SSE streams, metrics, logs). Publishing never blocks:
a subscriber whose queue is full loses its oldest event rather than stalling a unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "state" for unit state changes; other producers add their own kinds
    service: str | None
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    mono: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "service": self.service, "at": self.at, **self.data}


class EventBus:
    def __init__(self, history: int = 500) -> None:
        self._queues: set[asyncio.Queue[Event]] = set()
        self._callbacks: list[Callable[[Event], None]] = []
        self.history: list[Event] = []
        self._history_max = history

    def publish(self, event: Event) -> None:
        self.history.append(event)
        if len(self.history) > self._history_max:
            del self.history[: len(self.history) - self._history_max]
        for cb in self._callbacks:
            cb(event)
        for q in self._queues:
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
            q.put_nowait(event)

    def on(self, callback: Callable[[Event], None]) -> None:
        self._callbacks.append(callback)

    @contextlib.asynccontextmanager
    async def subscribe(self, maxsize: int = 1000) -> AsyncIterator[asyncio.Queue[Event]]:
        q: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self._queues.add(q)
        try:
            yield q
        finally:
            self._queues.discard(q)
