"""State-change events: every transition of every unit, timestamped, with its reason.

One bus fans events out to subscribers (SSE streams, metrics, logs). Publishing never blocks:
a subscriber that falls behind loses its oldest events, and is told so
rather than left to guess (a `Gap` from `Subscription.get`).

Ids. The bus is the one writer of event ids. They are integers that increase for the life of
the host, not just of the process: each boot numbers from the microseconds since the epoch at
its start, and a boot cannot publish an event per microsecond for long enough to reach the
next boot's base. So an id a client kept from before a restart is lower than anything this
boot has published: the stream can tell it missed the restart (a `gap`) instead of replaying
the wrong events as if they followed it. Integers stay exact in JavaScript up to 2^53 (about
year 2255 in microseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "state" for unit state changes; other producers add their own kinds
    service: str | None
    data: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)
    mono: float = field(default_factory=time.monotonic)
    id: int = 0  # set by the bus at publish

    def as_dict(self) -> dict[str, Any]:
        # `event_id`, not `id`: an operation event's `id` is the operation's (callers read it)
        return {"kind": self.kind, "service": self.service, "at": self.at, **self.data,
                "event_id": self.id}


@dataclass(frozen=True, slots=True)
class Gap:
    """Events a reader did not get: ids after `after` up to `until` (inclusive)."""

    after: int
    until: int
    reason: str  # "too_old": the ring buffer moved on; "restart": ids of another boot;
    #              "slow_reader": the subscriber's queue overflowed


class Subscription:
    """One reader's bounded queue. On overflow the oldest event is dropped and the loss is
    kept as a range, reported once by `next()` before the events that follow it."""

    def __init__(self, maxsize: int, start: int) -> None:
        self._items: deque[Event] = deque()
        self._max = maxsize
        self._ready = asyncio.Event()
        self._lost: tuple[int, int] | None = None  # (last delivered id, last dropped id)
        self._last = start

    def push(self, event: Event) -> None:
        if len(self._items) >= self._max:
            dropped = self._items.popleft()
            start = self._lost[0] if self._lost else self._last
            self._lost = (start, dropped.id)
        self._items.append(event)
        self._ready.set()

    def get_nowait(self) -> Event | Gap | None:
        if self._lost is not None:
            after, until = self._lost
            self._lost = None
            return Gap(after, until, "slow_reader")
        if not self._items:
            self._ready.clear()
            return None
        event = self._items.popleft()
        self._last = event.id
        return event

    async def get(self) -> Event | Gap:
        """The next event or gap. Callers bound the wait (`aio.within`)."""
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            await self._ready.wait()


class EventBus:
    def __init__(self, history: int = 1000) -> None:
        self._subs: set[Subscription] = set()
        self._callbacks: list[Callable[[Event], None]] = []
        self.history: deque[Event] = deque(maxlen=max(1, history))
        self.base = time.time_ns() // 1000
        self._seq = self.base

    @property
    def last_id(self) -> int:
        """The id of the newest event, or `base` when none was published yet."""
        return self._seq

    def publish(self, event: Event) -> Event:
        self._seq += 1
        event = dataclasses.replace(event, id=self._seq)
        self.history.append(event)
        for cb in self._callbacks:
            cb(event)
        for sub in self._subs:
            sub.push(event)
        return event

    def on(self, callback: Callable[[Event], None]) -> None:
        self._callbacks.append(callback)

    def since(self, last_id: int | None) -> tuple[Gap | None, list[Event]]:
        """What a reader that last saw `last_id` missed: a gap if some of it is gone (or was
        never ours), then the buffered events after it."""
        buffered = list(self.history)
        if last_id is None:
            return None, []
        oldest = buffered[0].id if buffered else self._seq + 1
        if last_id > self._seq or last_id < self.base:
            # Another boot's id (or a made-up one): what that boot published after it is gone,
            # and every event of this boot still buffered is news to the reader.
            return Gap(last_id, oldest - 1, "restart"), buffered
        gap = Gap(last_id, oldest - 1, "too_old") if last_id < oldest - 1 else None
        return gap, [e for e in buffered if e.id > last_id]

    @contextlib.asynccontextmanager
    async def subscribe(self, maxsize: int = 1000) -> AsyncIterator[Subscription]:
        sub = Subscription(maxsize, self._seq)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            self._subs.discard(sub)


def matches(event: Event, services: Iterable[str], kinds: Iterable[str]) -> bool:
    """The stream's filters: no filter lets everything through."""
    services, kinds = set(services), set(kinds)
    return ((not services or event.service in services)
            and (not kinds or event.kind in kinds))
