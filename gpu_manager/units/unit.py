"""A unit: one asyncio task owns one service's state; callers send commands and await results.

Nobody else changes a unit's state, and callers never act on a state they just read (the
classic check-then-act race): `ensure_ready()` and `stop()` are messages to the owner loop,
which applies them in order together with what its watchers report (exits, health).
Every state change is an `Event` with a timestamp and a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from loguru import logger

from gpu_manager.config import ServiceConfig
from gpu_manager.units.drivers.base import Driver, DriverError, ExitInfo
from gpu_manager.units.events import Event, EventBus
from gpu_manager.units.health import HealthChecker
from gpu_manager.units.states import RUNNING, ServiceState

S = ServiceState
RecordSink = Callable[[str, dict[str, Any] | None], None]
RestartGate = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class UnitResult:
    ok: bool
    state: ServiceState
    reason: str
    duration_s: float


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    base_s: float = 1.0  # first backoff, doubled per failure in the window
    max_s: float = 60.0
    limit: int = 5  # this many failures within window_s -> failed, no more restarts
    window_s: float = 60.0


class Unit:
    def __init__(
        self, name: str, cfg: ServiceConfig, driver: Driver, health: HealthChecker,
        bus: EventBus, *, on_record: RecordSink | None = None,
        restart_gate: RestartGate | None = None, policy: RestartPolicy | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.driver = driver
        self._health = health
        self._bus = bus
        self._on_record = on_record
        self._restart_gate = restart_gate
        self.policy = policy or RestartPolicy()
        self.state = S.STOPPED
        self.reason = "not started"
        self.since = time.time()
        self.last_exit: ExitInfo | None = None
        self.health_detail: str | None = None
        self.restarts = 0
        self.health_failures = 0  # failed checks of a running service, for metrics
        self._failures: deque[float] = deque()
        self._inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._gen = 0  # bumps with every launch/adopt/stop, so stale watcher news is dropped
        self._waiters: list[asyncio.Future[UnitResult]] = []
        self._start_began = 0.0
        self._start_auto = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._health_fails = 0

    # -- public API ---------------------------------------------------------------------------
    def start_loop(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name=f"unit-{self.name}")

    async def ensure_ready(self) -> UnitResult:
        return await self._ask("ensure_ready")

    async def stop(self, reason: str = "requested") -> UnitResult:
        return await self._ask("stop", reason)

    async def adopt(self, record: dict[str, Any]) -> bool:
        result = await self._ask("adopt", record)
        return result.ok

    async def close(self) -> None:
        """Stop owning the service without stopping it (daemon shutdown / restart)."""
        for task in [*self._tasks.values(), *([self._loop_task] if self._loop_task else [])]:
            task.cancel()
        for task in [*self._tasks.values(), *([self._loop_task] if self._loop_task else [])]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._loop_task = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "reason": self.reason, "since": self.since,
            "restarts": self.restarts, "health": self.health_detail,
            "last_exit": self.last_exit.describe() if self.last_exit else None,
        }

    async def _ask(self, *msg: Any) -> UnitResult:
        self.start_loop()
        fut: asyncio.Future[UnitResult] = asyncio.get_running_loop().create_future()
        await self._inbox.put((msg[0], fut, *msg[1:]))
        return await fut

    # -- the owner loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            kind, *args = await self._inbox.get()
            try:
                await getattr(self, f"_on_{kind}")(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the owner loop must outlive any single failure
                logger.opt(exception=exc).error(f"{self.name}: error handling {kind}: {exc}")
                for a in args:
                    if isinstance(a, asyncio.Future) and not a.done():
                        a.set_result(UnitResult(False, self.state, f"internal error: {exc}", 0))

    def _post(self, *msg: Any) -> None:
        self._inbox.put_nowait(msg)

    def _set(self, state: ServiceState, reason: str) -> None:
        prev, self.state, self.reason, self.since = self.state, state, reason, time.time()
        self._bus.publish(Event("state", self.name, {
            "state": state.value, "previous": prev.value, "reason": reason,
        }))
        logger.bind(service=self.name, state=state.value, previous=prev.value,
                    reason=reason).info(f"{prev.value} -> {state.value} ({reason})")

    def _spawn(self, key: str, coro: Coroutine[Any, Any, None]) -> None:
        old = self._tasks.pop(key, None)
        if old is not None:
            old.cancel()
        self._tasks[key] = asyncio.create_task(coro, name=f"{self.name}-{key}")

    def _cancel(self, *keys: str) -> None:
        for key in keys:
            task = self._tasks.pop(key, None)
            if task is not None:
                task.cancel()

    def _record(self) -> None:
        if self._on_record is not None:
            self._on_record(self.name, self.driver.record() if self.state in RUNNING else None)

    def _finish_waiters(self, ok: bool, reason: str) -> None:
        result = UnitResult(ok, self.state, reason, time.monotonic() - self._start_began)
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(result)
        self._waiters.clear()

    # -- commands -----------------------------------------------------------------------------
    async def _on_ensure_ready(self, fut: asyncio.Future[UnitResult]) -> None:
        if self.state == S.READY:
            fut.set_result(UnitResult(True, self.state, "already ready", 0.0))
            return
        self._waiters.append(fut)
        if self.state == S.STARTING:
            return  # joins the start in flight
        self._failures.clear()  # an explicit request resets the restart limit
        self._cancel("restart")
        if self.state == S.UNHEALTHY:
            await self._do_stop("restarting an unhealthy service")
        await self._begin_start(auto=False)

    async def _begin_start(self, auto: bool) -> None:
        self._gen += 1
        gen = self._gen
        self._start_began = time.monotonic()
        self._start_auto = auto
        self._health_fails = 0
        self._set(S.STARTING, "restart after failure" if auto else "start requested")
        self._spawn("start", self._start_sequence(gen, launch=True))

    async def _on_stop(self, fut: asyncio.Future[UnitResult], reason: str) -> None:
        t0 = time.monotonic()
        self._cancel("restart")
        if self.state in (S.STOPPED, S.FAILED) and not self.driver.running():
            fut.set_result(UnitResult(True, self.state, "not running", 0.0))
            return
        ok = await self._do_stop(reason)
        fut.set_result(UnitResult(ok, self.state, self.reason, time.monotonic() - t0))

    async def _do_stop(self, reason: str) -> bool:
        self._gen += 1  # everything the old instance's watchers say is now stale
        self._cancel("start", "health", "exit")
        if self._waiters:
            self._finish_waiters(False, f"stopped while starting: {reason}")
        self._set(S.STOPPING, reason)
        try:
            self.last_exit = await self.driver.stop(self.cfg.stop_timeout_s)
        except DriverError as exc:
            self._set(S.FAILED, f"stop failed: {exc}")
            self._record()
            return False
        self._set(S.STOPPED, reason)
        self._record()
        return True

    async def _on_adopt(self, fut: asyncio.Future[UnitResult], record: dict[str, Any]) -> None:
        if not await self.driver.adopt(record):
            fut.set_result(UnitResult(False, self.state, "nothing to adopt", 0.0))
            self._record()
            return
        self._gen += 1
        self._start_began = time.monotonic()
        self._start_auto = False
        self._set(S.STARTING, "adopted after a daemon restart")
        self._record()
        self._spawn("exit", self._watch_exit(self._gen))
        self._spawn("start", self._start_sequence(self._gen, launch=False))
        fut.set_result(UnitResult(True, self.state, "adopted", 0.0))

    # -- the start sequence and watchers (they only post; the loop decides) ---------------------
    async def _start_sequence(self, gen: int, launch: bool) -> None:
        if launch:
            try:
                await self.driver.start()
            except DriverError as exc:
                self._post("start_failed", gen, str(exc))
                return
            self._post("launched", gen)
        health = self.cfg.health
        if health is None:
            self._post("ready", gen, "started (no health check configured)")
            return
        deadline = self._start_began + self.cfg.start_timeout_s
        await asyncio.sleep(0.01)  # first check within 50 ms of the launch
        while True:
            ok, detail = await self._health.check(health)
            self.health_detail = detail
            if ok:
                self._post("ready", gen, f"healthy ({detail})")
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._post("start_failed", gen,
                           f"not healthy after {self.cfg.start_timeout_s:g}s (last: {detail})")
                return
            await asyncio.sleep(min(health.startup_interval_s, left))

    async def _watch_exit(self, gen: int) -> None:
        info = await self.driver.wait_exit()
        self._post("exited", gen, info)

    async def _watch_health(self, gen: int) -> None:
        health = self.cfg.health
        assert health is not None
        while True:
            await asyncio.sleep(health.interval_s)
            ok, detail = await self._health.check(health)
            self._post("health", gen, ok, detail)

    async def _on_launched(self, gen: int) -> None:
        if gen != self._gen:
            return
        self._record()
        self._spawn("exit", self._watch_exit(gen))

    async def _on_ready(self, gen: int, detail: str) -> None:
        if gen != self._gen or self.state != S.STARTING:
            return
        self._set(S.READY, detail)
        self._finish_waiters(True, detail)
        if self.cfg.health is not None:
            self._spawn("health", self._watch_health(gen))

    async def _on_start_failed(self, gen: int, reason: str) -> None:
        if gen != self._gen:
            return
        self._gen += 1
        self._cancel("start", "health", "exit")
        with contextlib.suppress(DriverError):  # leave nothing behind
            self.last_exit = await self.driver.stop(self.cfg.stop_timeout_s)
        self._set(S.FAILED, reason)
        self._record()
        self._finish_waiters(False, reason)
        if self._start_auto:
            self._after_failure(reason)

    async def _on_exited(self, gen: int, info: ExitInfo) -> None:
        if gen != self._gen:
            return
        self._gen += 1
        self.last_exit = info
        was = self.state
        self._cancel("start", "health", "exit")
        # The leader is gone; children it left in the group may still hold VRAM.
        with contextlib.suppress(DriverError):
            await self.driver.stop(min(self.cfg.stop_timeout_s, 5.0))
        why = f"{info.describe()} while {was.value}"
        self._set(S.STOPPED if info.clean else S.FAILED, why)
        self._record()
        self._finish_waiters(False, why)
        policy = self.cfg.restart
        if policy == "always" or (policy == "on-failure" and not info.clean):
            self._after_failure(why)

    async def _on_health(self, gen: int, ok: bool, detail: str) -> None:
        if gen != self._gen:
            return
        self.health_detail = detail
        if ok:
            self._health_fails = 0
            if self.state == S.UNHEALTHY:
                self._set(S.READY, f"healthy again ({detail})")
            return
        self._health_fails += 1
        self.health_failures += 1
        threshold = self.cfg.health.failure_threshold if self.cfg.health else 1
        if self.state == S.READY and self._health_fails >= threshold:
            self._set(S.UNHEALTHY, f"health check failed: {detail}")

    # -- restart policy -----------------------------------------------------------------------
    def _after_failure(self, why: str) -> None:
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.policy.window_s:
            self._failures.popleft()
        n = len(self._failures)
        if n >= self.policy.limit:
            self._set(S.FAILED, f"start limit hit: {n} failures in {self.policy.window_s:g}s, "
                                f"not restarting (last: {why})")
            return
        delay = min(self.policy.max_s, self.policy.base_s * 2 ** (n - 1))
        self._bus.publish(Event("restart_scheduled", self.name, {"in_s": delay, "reason": why}))
        logger.warning(f"{self.name}: restarting in {delay:g}s ({why})")
        gen = self._gen
        self._spawn("restart", self._restart_after(delay, gen))

    async def _restart_after(self, delay: float, gen: int) -> None:
        await asyncio.sleep(delay)
        self._post("restart", gen)

    async def _on_restart(self, gen: int) -> None:
        if gen != self._gen or self.state not in (S.STOPPED, S.FAILED):
            return
        if self._restart_gate is not None and not await self._restart_gate(self.name):
            self._set(self.state, "restart declined: the GPU budget or lock does not allow it")
            return
        self.restarts += 1
        await self._begin_start(auto=True)
