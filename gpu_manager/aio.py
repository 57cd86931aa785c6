"""Small asyncio helpers: bounded waits and supervised background tasks.

Why not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that races with the
awaited thing completing (bpo-37658/gh-86296, fixed in 3.12), and a background loop that
misses its cancel keeps a daemon from ever shutting down. `asyncio.timeout` tells its own
expiry from an outside cancel, so we use it everywhere.

Why a supervisor: a bare `asyncio.create_task` whose coroutine raises dies silently (the
exception waits in the task until someone looks), and whatever that task was keeping up to
date (lock view, pid books, lease expiry, config watch) goes stale with no sign. Every
long-lived task of the daemon runs under `Supervisor`: a crash is logged with its traceback,
shown in `/ready`, and the task is restarted with a backoff; a task that keeps crashing is
given up on, and `/ready` says so until the daemon restarts.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loguru import logger

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` up to `timeout` seconds; True when it is set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def within(aw: Awaitable[T], timeout: float) -> T:
    """`await aw` with a deadline: raises TimeoutError when it passes."""
    async with asyncio.timeout(timeout):
        return await aw


async def guarded(factory: Callable[[], Coroutine[Any, Any, None]], name: str,
                  on_crash: Callable[[Exception], None]) -> None:
    """Run a one-shot task; an unexpected exception is logged with its traceback and handed to
    `on_crash`, which turns it into state (a unit's owner loop posts itself a message).
    A factory, not a coroutine: a task cancelled before its first step would otherwise leave
    a coroutine object that was never awaited."""
    try:
        await factory()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.opt(exception=exc).error(f"task {name} crashed: {type(exc).__name__}: {exc}")
        on_crash(exc)


async def settle(tasks: list[asyncio.Task[Any]], timeout: float) -> None:
    """Cancel `tasks` and wait (bounded) until they are done; never re-raise their errors."""
    for task in tasks:
        task.cancel()
    pending = [t for t in tasks if not t.done()]
    if pending:
        _, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            logger.error(f"task {task.get_name()} did not end within {timeout:g}s of its cancel")
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: it was logged when it happened


@dataclass
class TaskHealth:
    """What a supervised task has been through, for /ready and the logs."""

    name: str
    crashes: int = 0
    last_error: str | None = None
    last_crash_at: float | None = None  # wall clock
    down: bool = False  # crashed and waiting for its restart
    gave_up: bool = False  # crashed too often: not restarted any more
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=16))

    @property
    def ok(self) -> bool:
        return not (self.down or self.gave_up)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "crashes": self.crashes, "last_error": self.last_error,
                "last_crash_at": self.last_crash_at, "gave_up": self.gave_up}


class Supervisor:
    """Owns the daemon's long-lived tasks: restarts a crashed one, remembers why."""

    def __init__(self, *, base_s: float = 0.5, max_s: float = 30.0, limit: int = 5,
                 window_s: float = 60.0) -> None:
        self.base_s, self.max_s, self.limit, self.window_s = base_s, max_s, limit, window_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.health: dict[str, TaskHealth] = {}

    def spawn(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `factory()` as task `name`, restarting it whenever it raises."""
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"task {name} is already running")
        self.health.setdefault(name, TaskHealth(name))
        self._tasks[name] = asyncio.create_task(self._run(name, factory), name=name)

    async def _run(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        h = self.health[name]
        while True:
            try:
                await factory()
                logger.info(f"task {name} finished")
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                now = time.monotonic()
                h.crashes += 1
                h.last_error = f"{type(exc).__name__}: {exc}"
                h.last_crash_at = time.time()
                h.recent.append(now)
                in_window = sum(1 for t in h.recent if now - t <= self.window_s)
                if in_window >= self.limit:
                    h.gave_up = True
                    logger.opt(exception=exc).critical(
                        f"task {name} crashed {in_window} times in {self.window_s:g}s; "
                        f"giving up on it (the daemon is degraded): {h.last_error}")
                    return
                delay = min(self.max_s, self.base_s * 2 ** (in_window - 1))
                logger.opt(exception=exc).error(
                    f"task {name} crashed ({h.last_error}); restarting in {delay:g}s")
                h.down = True
                await asyncio.sleep(delay)
                h.down = False

    @property
    def ok(self) -> bool:
        return all(h.ok for h in self.health.values())

    def problems(self) -> dict[str, dict[str, Any]]:
        return {n: h.as_dict() for n, h in self.health.items() if h.crashes}

    async def close(self, timeout: float = 5.0) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        await settle(tasks, timeout)


class Held:
    """Release an already acquired asyncio.Lock on exit (acquire happened outside)."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self.lock = lock

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        self.lock.release()


def retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # seen by whoever awaited it, or by nobody: never "never retrieved"
