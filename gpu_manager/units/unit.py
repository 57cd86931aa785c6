"""A unit: one asyncio task owns one service's state; callers send it commands and await results.

Nobody else changes a unit's state, and callers never act on a state they just read (the
classic check-then-act race): `ensure_ready()`, `stop()`, `adopt()` and `reconfigure()` are
messages to the owner loop, which applies them in order together with what its watchers
report (exits, health). Every state change is an `Event` with a timestamp and a reason.

Bounds (the "never wedged" invariants):
- every driver call runs under a deadline derived from the service's config (start and stop
  timeouts); its expiry is a DriverError like any other, so the unit ends `failed`;
- every helper task (start sequence, exit and health watchers, restart timer) runs guarded:
  an unexpected exception is logged with its traceback and posted to the owner loop as a
  `crashed` message, which turns it into state;
- a caller's wait for an answer is bounded too (`answer_bound_s`), in case the owner loop
  itself is stuck behind something no deadline covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from loguru import logger

from gpu_manager.aio import guarded, settle
from gpu_manager.bounds import DEFAULT, Bounds
from gpu_manager.config import ServiceConfig
from gpu_manager.units.drivers.base import Driver, DriverError, ExitInfo
from gpu_manager.units.events import Event, EventBus
from gpu_manager.units.health import HealthChecker
from gpu_manager.units.restart import RestartPolicy, Restarts
from gpu_manager.units.result import UnitResult
from gpu_manager.units.states import (
    HOLDS_GPU,
    RUNNING,
    TRANSIENT,
    InvalidTransition,
    ServiceState,
    allowed,
)

S = ServiceState
RecordSink = Callable[[str, dict[str, Any] | None], None]
RestartGate = Callable[[str], Awaitable[bool]]



class Unit:
    def __init__(
        self, name: str, cfg: ServiceConfig, driver: Driver, health: HealthChecker,
        bus: EventBus, *, on_record: RecordSink | None = None,
        restart_gate: RestartGate | None = None, policy: RestartPolicy | None = None,
        bounds: Bounds = DEFAULT,
    ) -> None:
        self.name = name
        self.bounds = bounds
        self.cfg = cfg
        self.driver = driver
        self._health = health
        self._bus = bus
        self._on_record = on_record
        self._restart_gate = restart_gate
        self.state = S.STOPPED
        self.reason = "not started"
        self.since = time.time()
        self.since_mono = time.monotonic()
        self.last_exit: ExitInfo | None = None
        self.health_detail: str | None = None
        self.health_failures = 0  # failed checks of a running service, for metrics
        self.faults = 0  # crashed helper tasks and handler errors, for /gpu/status
        self.restarts = Restarts(policy or RestartPolicy())
        self._inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._gen = 0  # bumps with every launch/adopt/stop, so stale watcher news is dropped
        self._waiters: list[asyncio.Future[UnitResult]] = []
        self._start_began = 0.0
        self._start_auto = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._health_fails = 0
        self._next: tuple[ServiceConfig, Driver] | None = None  # reconfigure while running

    # -- public API ---------------------------------------------------------------------------
    def start_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run(), name=f"unit-{self.name}")

    @property
    def stop_bound_s(self) -> float:
        return self.cfg.stop_timeout_s + self.bounds.kill_grace_s

    @property
    def start_sequence_bound_s(self) -> float:
        """The start sequence's backstop: its own health deadline is start_timeout_s, and the
        last check may run its full timeout past that."""
        health = self.cfg.health
        margin = self.bounds.answer_margin_s
        return self.cfg.start_timeout_s + (health.timeout_s + margin if health else margin)

    @property
    def start_bound_s(self) -> float:
        # an unhealthy service is stopped first; a failed start stops what it launched
        return self.start_sequence_bound_s + 2 * self.stop_bound_s

    async def ensure_ready(self) -> UnitResult:
        return await self._ask(self.start_bound_s, "ensure_ready")

    async def stop(self, reason: str = "requested") -> UnitResult:
        return await self._ask(self.stop_bound_s, "stop", reason)

    async def adopt(self, record: dict[str, Any]) -> bool:
        result = await self._ask(self.bounds.unit_call_s, "adopt", record)
        return result.ok

    async def reconfigure(self, cfg: ServiceConfig, driver: Driver) -> UnitResult:
        """Take a changed definition: now when nothing runs, else at the next launch."""
        return await self._ask(self.bounds.unit_call_s, "reconfigure", cfg, driver)

    async def close(self) -> None:
        """Stop owning the service without stopping it (daemon shutdown / restart)."""
        tasks = [*self._tasks.values(), *([self._loop_task] if self._loop_task else [])]
        self._tasks.clear()
        self._loop_task = None
        await settle(tasks, 5.0)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "reason": self.reason, "since": self.since,
            "restarts": self.restarts.count, "health": self.health_detail,
            "last_exit": self.last_exit.describe() if self.last_exit else None,
            "faults": self.faults,
        }

    @property
    def holds_gpu(self) -> bool:
        """May hold VRAM: a state that says so, or a process that lives on although the unit
        gave up on it (a stop that failed): the planner must count it, and a stop must
        still reach it."""
        return self.state in HOLDS_GPU or self.driver.running()

    def overdue(self, now: float | None = None) -> bool:
        """In a transient state for longer than its deadline allows (an invariant breach)."""
        if self.state not in TRANSIENT:
            return False
        bound = self.start_bound_s if self.state == S.STARTING else self.stop_bound_s
        return (now or time.monotonic()) - self.since_mono > bound + self.bounds.answer_margin_s

    async def _ask(self, bound: float, *msg: Any) -> UnitResult:
        self.start_loop()
        fut: asyncio.Future[UnitResult] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait((msg[0], fut, *msg[1:]))
        try:
            async with asyncio.timeout(bound + self.bounds.answer_margin_s):
                return await asyncio.shield(fut)
        except TimeoutError:
            logger.error(f"{self.name}: no answer to {msg[0]} within {bound:g}s "
                         f"(state {self.state.value}: {self.reason})")
            waited = bound + self.bounds.answer_margin_s
            return UnitResult(False, self.state, f"{self.name} did not answer {msg[0]} within "
                              f"{waited:g}s (state {self.state.value})", waited)

    # -- the owner loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            kind, *args = await self._inbox.get()
            try:
                await getattr(self, f"_on_{kind}")(*args)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the owner loop must outlive any single failure
                self.faults += 1
                logger.opt(exception=exc).error(f"{self.name}: error handling {kind}: {exc}")
                self._recover(f"internal error handling {kind}: {type(exc).__name__}: {exc}")
                for a in args:
                    if isinstance(a, asyncio.Future) and not a.done():
                        a.set_result(UnitResult(False, self.state, f"internal error: {exc}", 0))

    def _recover(self, why: str) -> None:
        """After a handler failed: never leave the unit in a state nothing will move it out of.
        A start whose sequence task still runs will finish on its own; anything else
        transient (or a start with no task left) becomes `failed`, with the reason."""
        starting_alive = self.state == S.STARTING and self._alive("start")
        if self.state in TRANSIENT and not starting_alive:
            self._gen += 1
            self._cancel("start", "health", "exit")
            self._force(S.FAILED, why)
            self._record()
            self._finish_waiters(False, why)

    def _post(self, *msg: Any) -> None:
        self._inbox.put_nowait(msg)

    def _set(self, state: ServiceState, reason: str) -> None:
        if not allowed(self.state, state):
            raise InvalidTransition(self.name, self.state, state)
        self._force(state, reason)

    def _force(self, state: ServiceState, reason: str) -> None:
        """Set a state without the table: only `_recover` uses it, to reach `failed`."""
        prev, self.state, self.reason = self.state, state, reason
        self.since, self.since_mono = time.time(), time.monotonic()
        self._bus.publish(Event("state", self.name, {
            "state": state.value, "previous": prev.value, "reason": reason,
        }))
        logger.bind(service=self.name, state=state.value, previous=prev.value,
                    reason=reason).info(f"{prev.value} -> {state.value} ({reason})")

    def _note(self, reason: str) -> None:
        """A new reason for the same state (e.g. a restart declined): an event, no change."""
        self.reason = reason
        self._bus.publish(Event("state", self.name, {
            "state": self.state.value, "previous": self.state.value, "reason": reason}))

    def _spawn(self, key: str, factory: Callable[[], Coroutine[Any, Any, None]],
               gen: int) -> None:
        old = self._tasks.pop(key, None)
        if old is not None:
            old.cancel()
        self._tasks[key] = asyncio.create_task(
            guarded(factory, f"{self.name}-{key}",
                    lambda exc: self._post("crashed", key, gen, exc)),
            name=f"{self.name}-{key}")

    def _alive(self, key: str) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

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

    async def _driver(self, what: str, aw: Awaitable[Any], timeout: float) -> Any:
        """A driver call under its deadline; expiry and any error become a DriverError."""
        try:
            async with asyncio.timeout(timeout):
                return await aw
        except TimeoutError as exc:
            raise DriverError(f"{what} did not finish within {timeout:g}s") from exc
        except DriverError:
            raise
        except Exception as exc:
            logger.opt(exception=exc).error(f"{self.name}: {what} raised {exc!r}")
            raise DriverError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    async def _stop_driver(self) -> ExitInfo:
        info: ExitInfo = await self._driver(f"stopping {self.name}",
                                  self.driver.stop(self.cfg.stop_timeout_s), self.stop_bound_s)
        return info

    # -- commands -----------------------------------------------------------------------------
    async def _on_ensure_ready(self, fut: asyncio.Future[UnitResult]) -> None:
        if self.state == S.READY:
            fut.set_result(UnitResult(True, self.state, "already ready", 0.0))
            return
        self._waiters.append(fut)
        if self.state == S.STARTING:
            return  # joins the start in flight
        self.restarts.reset()  # an explicit request resets the restart limit
        self._cancel("restart")
        if self.state == S.UNHEALTHY and not await self._do_stop(
                "restarting an unhealthy service"):
            self._finish_waiters(False, self.reason)
            return
        await self._begin_start(auto=False)

    async def _begin_start(self, auto: bool) -> None:
        if self._next is not None and not self.driver.running():
            self.cfg, self.driver = self._next  # a reload changed it while it ran
            self._next = None
        self._gen += 1
        self._start_began = time.monotonic()
        self._start_auto = auto
        self._health_fails = 0
        self._set(S.STARTING, "restart after failure" if auto else "start requested")
        gen = self._gen
        self._spawn("start", lambda: self._start_sequence(gen, launch=True), gen)

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
            self.last_exit = await self._stop_driver()
        except DriverError as exc:
            self._set(S.FAILED, f"stop failed: {exc}")
            self._record()
            return False
        self._set(S.STOPPED, reason)
        self._record()
        return True

    async def _on_adopt(self, fut: asyncio.Future[UnitResult], record: dict[str, Any]) -> None:
        if not await self._driver(f"adopting {self.name}", self.driver.adopt(record),
                                  self.bounds.unit_call_s):
            fut.set_result(UnitResult(False, self.state, "nothing to adopt", 0.0))
            self._record()
            return
        self._gen += 1
        self._start_began = time.monotonic()
        self._start_auto = False
        self._set(S.STARTING, "adopted after a daemon restart")
        self._record()
        gen = self._gen
        self._spawn("exit", lambda: self._watch_exit(gen), gen)
        self._spawn("start", lambda: self._start_sequence(gen, launch=False), gen)
        fut.set_result(UnitResult(True, self.state, "adopted", 0.0))

    async def _on_reconfigure(self, fut: asyncio.Future[UnitResult], cfg: ServiceConfig,
                              driver: Driver) -> None:
        if self.driver.running() or self.state in RUNNING:
            # The running process stays on its old definition (and the old driver, which
            # knows its pid or container) until it is stopped; the next launch uses these.
            self._next = (cfg, driver)
            fut.set_result(UnitResult(True, self.state, "applies at the next start", 0.0))
            return
        self.cfg, self.driver, self._next = cfg, driver, None
        fut.set_result(UnitResult(True, self.state, "applied", 0.0))

    # -- the start sequence and watchers (they only post; the loop decides) ---------------------
    async def _start_sequence(self, gen: int, launch: bool) -> None:
        deadline = self._start_began + self.cfg.start_timeout_s
        bound = self.start_sequence_bound_s
        try:
            async with asyncio.timeout(bound):
                await self._start_steps(gen, launch, deadline)
        except TimeoutError:
            self._post("start_failed", gen, f"start did not finish within {bound:g}s "
                                            f"(last: {self.health_detail or 'no answer'})")

    async def _start_steps(self, gen: int, launch: bool, deadline: float) -> None:
        if launch:
            try:
                await self._driver(f"launching {self.name}", self.driver.start(),
                                   self.cfg.start_timeout_s)
            except DriverError as exc:
                self._post("start_failed", gen, str(exc))
                return
            self._post("launched", gen)
        health = self.cfg.health
        if health is None:
            self._post("ready", gen, "started (no health check configured)")
            return
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
            try:  # the checker bounds itself; this bounds any checker
                async with asyncio.timeout(health.timeout_s + self.bounds.answer_margin_s):
                    ok, detail = await self._health.check(health)
            except TimeoutError:
                ok, detail = False, f"no answer within {health.timeout_s:g}s"
            self._post("health", gen, ok, detail)

    async def _on_crashed(self, key: str, gen: int, exc: Exception) -> None:
        self.faults += 1
        if gen != self._gen:
            return
        why = f"internal error in {key}: {type(exc).__name__}: {exc}"
        if key == "start":
            await self._on_start_failed(gen, why)
        elif key in ("health", "exit") and self.state in RUNNING:
            # A watcher died: without it exits or health go unseen. Start a fresh one.
            watch = self._watch_health if key == "health" else self._watch_exit
            self._spawn(key, lambda: watch(gen), gen)
        elif key == "restart":
            self._schedule_restart(why)

    async def _on_launched(self, gen: int) -> None:
        if gen != self._gen:
            return
        self._record()
        self._spawn("exit", lambda: self._watch_exit(gen), gen)

    async def _on_ready(self, gen: int, detail: str) -> None:
        if gen != self._gen or self.state != S.STARTING:
            return
        self._set(S.READY, detail)
        self._finish_waiters(True, detail)
        if self.cfg.health is not None:
            self._spawn("health", lambda: self._watch_health(gen), gen)

    async def _on_start_failed(self, gen: int, reason: str) -> None:
        if gen != self._gen:
            return
        self._gen += 1
        self._cancel("start", "health", "exit")
        with contextlib.suppress(DriverError):  # leave nothing behind
            self.last_exit = await self._stop_driver()
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
            await self._driver(f"stopping what {self.name} left",
                               self.driver.stop(min(self.cfg.stop_timeout_s, 5.0)),
                               min(self.cfg.stop_timeout_s, 5.0) + self.bounds.kill_grace_s)
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
        delay = self.restarts.failed()
        if delay is None:
            text = (f"start limit hit: {self.restarts.recent} failures in "
                    f"{self.restarts.policy.window_s:g}s, not restarting (last: {why})")
            if self.state == S.FAILED:
                self._note(text)
            else:
                self._set(S.FAILED, text)
            return
        self._bus.publish(Event("restart_scheduled", self.name, {"in_s": delay, "reason": why}))
        logger.warning(f"{self.name}: restarting in {delay:g}s ({why})")
        gen = self._gen
        self._spawn("restart", lambda: self._restart_after(delay, gen), gen)

    def _schedule_restart(self, why: str) -> None:
        """Try the restart again later: a declined restart is not a failure of the service."""
        delay = self.restarts.declined()
        self._note(f"{why}; trying again in {delay:g}s")
        gen = self._gen
        self._spawn("restart", lambda: self._restart_after(delay, gen), gen)

    async def _restart_after(self, delay: float, gen: int) -> None:
        await asyncio.sleep(delay)
        self._post("restart", gen)

    async def _on_restart(self, gen: int) -> None:
        if gen != self._gen or self.state not in (S.STOPPED, S.FAILED):
            return
        if self._restart_gate is not None:
            try:
                async with asyncio.timeout(self.stop_bound_s):
                    allowed_now = await self._restart_gate(self.name)
            except TimeoutError:
                allowed_now = False
            if not allowed_now:
                self._schedule_restart("restart declined: the GPU budget or lock does not "
                                       "allow it now")
                return
        self.restarts.restarted()
        await self._begin_start(auto=True)
