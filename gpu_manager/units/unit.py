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
from typing import Any, assert_never

from loguru import logger

from gpu_manager.config import ServiceConfig
from gpu_manager.units.drivers.base import Driver, DriverError, ExitInfo
from gpu_manager.units.events import Event
from gpu_manager.units.messages import (
    Adopt,
    Crashed,
    EnsureReady,
    Exited,
    Health,
    Launched,
    Message,
    Ready,
    Reconfigure,
    Restart,
    Sleep,
    StartFailed,
    Stop,
    WakeRefused,
    Woke,
    Woken,
)
from gpu_manager.units.owner import RecordSink, RestartGate, S, answer
from gpu_manager.units.result import UnitResult
from gpu_manager.units.sleepwake import SleepWake
from gpu_manager.units.states import RUNNING

__all__ = ["RecordSink", "RestartGate", "Unit"]


class Unit(SleepWake):
    async def _handle(self, msg: Message) -> None:
        """The one dispatch of the owner loop: every message kind, checked by the type
        checker (a new kind without a case here fails `assert_never`)."""
        match msg:
            case EnsureReady(fut):
                await self._on_ensure_ready(fut)
            case Stop(fut, reason):
                await self._on_stop(fut, reason)
            case Sleep(fut, reason, requester, deep):
                await self._on_sleep(fut, reason, requester, deep)
            case Woke(fut, detail):
                await self._on_woke(fut, detail)
            case Adopt(fut, record):
                await self._on_adopt(fut, record)
            case Reconfigure(fut, cfg, driver):
                await self._on_reconfigure(fut, cfg, driver)
            case Crashed(key, gen, exc):
                await self._on_crashed(key, gen, exc)
            case Launched(gen):
                await self._on_launched(gen)
            case Ready(gen, detail):
                await self._on_ready(gen, detail)
            case StartFailed(gen, reason):
                await self._on_start_failed(gen, reason)
            case Exited(gen, info):
                await self._on_exited(gen, info)
            case Health(gen, ok, detail):
                await self._on_health(gen, ok, detail)
            case Restart(gen, allowed):
                await self._on_restart(gen, allowed)
            case Woken(gen, detail):
                await self._on_woken(gen, detail)
            case WakeRefused(gen, detail):
                await self._on_wake_refused(gen, detail)
            case _:
                assert_never(msg)

    # -- commands -----------------------------------------------------------------------------
    async def _on_ensure_ready(self, fut: asyncio.Future[UnitResult]) -> None:
        if self.state == S.READY:
            answer(fut, UnitResult(True, self.state, "already ready", 0.0))
            return
        self._waiters.append(fut)
        if self.state in (S.STARTING, S.WAKING):
            return  # joins the start (or wake) in flight
        self.restarts.reset()  # an explicit request resets the restart limit
        self._cancel("restart")
        if self.state == S.SLEEPING and self.cfg.sleep is not None:
            self._begin_wake()
            return
        lingering = self.state != S.UNHEALTHY and self.driver.running()
        if (self.state == S.UNHEALTHY or lingering) and not await self._do_stop(
                "restarting an unhealthy service" if not lingering
                else "restarting: what the last stop left is still running"):
            self._finish_waiters(False, self.reason)
            return
        await self._begin_start(auto=False)

    async def _begin_start(self, auto: bool) -> None:
        if self._next is not None and not self.driver.running():
            self.cfg, self.driver = self._next  # a reload changed it while it ran
            self._next = None
        # the cards it was placed on (a restart too)
        self.driver.visible, self.driver.cards = self.visible, self.devices
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
            answer(fut, UnitResult(True, self.state, "not running", 0.0))
            return
        ok = await self._do_stop(reason)
        answer(fut, UnitResult(ok, self.state, self.reason, time.monotonic() - t0))

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
        try:
            found = await self._driver(f"adopting {self.name}", self.driver.adopt(record),
                                       self.bounds.unit_call_s)
        except DriverError as exc:  # the engine is down, say: we cannot tell
            answer(fut, UnitResult(False, self.state, str(exc), 0.0, unknown=True))
            return
        if not found:
            answer(fut, UnitResult(False, self.state, "nothing to adopt", 0.0))
            self._record()
            return
        self._gen += 1
        self._start_began = time.monotonic()
        self._start_auto = False
        self.devices = tuple(int(d) for d in record.get("devices") or ())
        self.visible = tuple(str(v) for v in record.get("visible") or ())
        self.driver.visible, self.driver.cards = self.visible, self.devices
        gen = self._gen
        self._spawn("exit", lambda: self._watch_exit(gen), gen)
        asleep, why = await self._was_asleep(record)
        if asleep:
            # Asleep before the restart (or maybe: a sleep or wake was under way): asleep
            # now; a wake brings it back, and the GPU's evidence (it holds more than its
            # residual) makes it `ready` at the next pid refresh if it is not.
            self._sleep_memo = tuple(str(m) for m in record.get("memo") or ())
            self._deep = bool(record.get("deep"))
            self._set(S.SLEEPING, f"adopted after a daemon restart, asleep ({why})")
            self._record()
            answer(fut, UnitResult(True, self.state, "adopted, asleep", 0.0))
            return
        self._set(S.STARTING, "adopted after a daemon restart")
        self._record()
        self._spawn("start", lambda: self._start_sequence(gen, launch=False), gen)
        answer(fut, UnitResult(True, self.state, "adopted", 0.0))

    async def _was_asleep(self, record: dict[str, Any]) -> tuple[bool, str]:
        """Whether an adopted service sleeps, reconciled from the record and the service's
        own answer: a record that says a sleep or wake was under way (the daemon died during
        the call) is not taken at its word."""
        if self.cfg.sleep is None:
            return False, "it has no sleep: block"
        intent = record.get("intent")
        if not record.get("asleep") and intent not in ("sleep", "wake"):
            return False, "the record says awake"
        self._deep = bool(record.get("deep"))  # asked by the way it was put to sleep
        said = await self._asleep_now()
        if said is not None:
            return said, f"it says so{f', after a {intent} was cut short' if intent else ''}"
        # It cannot say: the record (a cut-short sleep or wake counts as asleep, the safe
        # side: a start then wakes it, and memory it holds shows it awake)
        return True, ("the record says asleep" if intent is None
                      else f"a {intent} was cut short and it cannot say")

    async def _on_reconfigure(self, fut: asyncio.Future[UnitResult], cfg: ServiceConfig,
                              driver: Driver) -> None:
        if self.driver.running() or self.state in RUNNING:
            # The running process stays on its old definition (and the old driver, which
            # knows its pid or container) until it is stopped; the next launch uses these.
            self._next = (cfg, driver)
            answer(fut, UnitResult(True, self.state, "applies at the next start", 0.0))
            return
        self.cfg, self.driver, self._next = cfg, driver, None
        answer(fut, UnitResult(True, self.state, "applied", 0.0))

    # -- what the helper tasks (units/watchers.py) report --------------------------------------
    async def _on_crashed(self, key: str, gen: int, exc: Exception) -> None:
        self.faults += 1
        if gen != self._gen:
            return
        why = f"internal error in {key}: {type(exc).__name__}: {exc}"
        if key == "start":
            await self._on_start_failed(gen, why)
        elif (key == "exit" and self.state in RUNNING) or \
                (key == "health" and self.state in (S.READY, S.UNHEALTHY)):
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
        if gen != self._gen or self.state not in (S.STARTING, S.WAKING):
            return
        if self.state == S.WAKING:
            self.wakes += 1
            detail = f"awake: {detail}"
        self._set(S.READY, detail)
        self._record()  # (after a wake: the record no longer says asleep)
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
        """The restart timer; it also asks the gate, here and not in the owner loop, so the
        loop keeps answering (a stop, a start) while the gate looks at the GPU."""
        await asyncio.sleep(delay)
        allowed = True
        if self._restart_gate is not None:
            try:
                async with asyncio.timeout(self.stop_bound_s):
                    allowed = await self._restart_gate(self.name)
            except TimeoutError:
                allowed = False
        self._post(Restart(gen, allowed))

    async def _on_restart(self, gen: int, allowed: bool) -> None:
        if gen != self._gen or self.state not in (S.STOPPED, S.FAILED):
            return  # something else happened meanwhile (a start, a stop): that wins
        if not allowed:
            self._schedule_restart("restart declined: the GPU budget or lock does not "
                                   "allow it now")
            return
        self.restarts.restarted()
        await self._begin_start(auto=True)
