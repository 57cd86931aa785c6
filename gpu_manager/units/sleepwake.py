"""Sleep and wake, as messages to a unit's owner loop like start and stop.

A sleep asks the server to let its VRAM go (units/sleeper.py) and, when it says it did, moves
the unit to `sleeping` (the GPU's evidence is the executor's to check: it stops a service
whose sleep freed nothing). A wake is a start without the launch: the wake call, then the
health check within the start timeout; a refused wake (a CUDA OOM) leaves it `sleeping`,
a wake that never becomes healthy ends `failed` with what it woke stopped, like a start.
Both keep the process's generation: its exit watcher goes on watching through them.

Intent before action: the record says "sleep" (or "wake") and is on disk before the call is
made, so a daemon killed during the call finds, at its restart, that it must ask the service
(and the GPU) whether it sleeps, instead of adopting it as whatever it was before.
"""

from __future__ import annotations

import asyncio
import time

from loguru import logger

from gpu_manager.config import SleepConfig
from gpu_manager.units.messages import StartFailed, WakeRefused, Woken
from gpu_manager.units.owner import S, answer
from gpu_manager.units.result import UnitResult
from gpu_manager.units.sleeper import Outcome
from gpu_manager.units.watchers import Watchers


class SleepWake(Watchers):
    def _begin_wake(self) -> None:
        """Wake a sleeping service: the wake call, then the health check as after a start.
        Same process, same generation: its exit watcher keeps watching."""
        self._start_began = time.monotonic()
        self._start_auto = False
        self._health_fails = 0
        self._set(S.WAKING, "wake requested")
        self._intent = "wake"
        self._record()  # (on disk before the call: the wake sequence flushes first)
        gen = self._gen
        self._spawn("start", lambda: self._wake_sequence(gen), gen)

    def _sleep_cfg(self, deep: bool) -> SleepConfig | None:
        """How it sleeps: its `sleep:` block, or (`deep`) its ladder's cuda-checkpoint, with
        the same bounds."""
        sleep = self.cfg.sleep
        if not deep or sleep is None:
            return sleep
        return SleepConfig(api="cuda-checkpoint", timeout_s=sleep.timeout_s,
                           wake_timeout_s=sleep.wake_timeout_s, residual_mb=0,
                           host_ram_mb=self.cfg.vram_mb)

    async def _wake_sequence(self, gen: int) -> None:
        sleep = self._sleep_cfg(self._deep)  # woken the way it was put to sleep
        assert sleep is not None
        bound = sleep.wake_timeout_s + self.start_sequence_bound_s + self.bounds.lock_io_s
        try:
            async with asyncio.timeout(bound):
                if self._flush is not None:
                    await self._flush()
                outcome = await self.sleeper.wake(self.name, sleep, self._sleep_memo)
                if not outcome.ok:
                    self._post(WakeRefused(gen, outcome.detail))
                    return
                self._post(Woken(gen, outcome.detail))
                await self._start_steps(gen, False, time.monotonic() + self.cfg.start_timeout_s)
        except TimeoutError:
            self._post(StartFailed(gen, f"wake did not finish within {bound:g}s "
                                        f"(last: {self.health_detail or 'no answer'})"))

    async def _on_woken(self, gen: int, detail: str) -> None:
        if gen == self._gen and self.state == S.WAKING:
            self._note(f"woken ({detail}); checking health")

    async def _on_wake_refused(self, gen: int, detail: str) -> None:
        if gen != self._gen or self.state != S.WAKING:
            return
        self._intent = None
        self._set(S.SLEEPING, f"wake failed: {detail}")
        self._record()
        self._finish_waiters(False, f"wake failed: {detail}")

    async def _on_sleep(self, fut: asyncio.Future[UnitResult], reason: str,
                        requester: str, deep: bool = False) -> None:
        t0 = time.monotonic()
        sleep = self._sleep_cfg(deep)
        if self.state == S.SLEEPING:
            answer(fut, UnitResult(True, self.state, "already asleep", 0.0))
            return
        if sleep is None or self.state != S.READY:
            why = "no sleep: block" if sleep is None else f"not ready ({self.state.value})"
            answer(fut, UnitResult(False, self.state, f"cannot sleep: {why}", 0.0))
            return
        self._cancel("health")  # a sleeping server may well fail its check: not a fault
        self._deep = deep
        await self._announce("sleep")
        outcome = await self._sleep_call(sleep, requester, reason)
        took = time.monotonic() - t0
        if not outcome.ok or self.state != S.READY:
            self._intent = None
            self._record()
            if self.state == S.READY and self.cfg.health is not None:
                gen = self._gen
                self._spawn("health", lambda: self._watch_health(gen), gen)
            answer(fut, UnitResult(False, self.state, outcome.detail, took))
            return
        self._sleep_memo = outcome.memo
        self._intent = None
        self.sleeps += 1
        self._set(S.SLEEPING, f"{reason}: {outcome.detail}")
        self._record()
        answer(fut, UnitResult(True, self.state, outcome.detail, took))

    async def _sleep_call(self, sleep: SleepConfig, requester: str, reason: str) -> Outcome:
        """The sleeper bounds itself; this bounds any sleeper, and turns a raise into an
        answer (the unit stays `ready`, the executor stops it instead)."""
        bound = sleep.timeout_s + self.bounds.answer_margin_s
        try:
            async with asyncio.timeout(bound):
                return await self.sleeper.sleep(self.name, sleep, requester, reason)
        except TimeoutError:
            return Outcome(False, f"no answer to sleep within {bound:g}s")
        except Exception as exc:
            logger.opt(exception=exc).error(f"{self.name}: sleep raised {exc!r}")
            return Outcome(False, f"sleep failed: {type(exc).__name__}: {exc}")

    async def _asleep_now(self) -> bool | None:
        """The service's own word on whether it sleeps (None: it has no way to say, or did
        not answer): asked at adoption when the record says a sleep or wake was under way
        (a checkpointed one is asked of the driver: its own API may block on CUDA)."""
        sleep = self._sleep_cfg(self._deep)
        if sleep is None:
            return None
        bound = sleep.timeout_s + self.bounds.answer_margin_s
        try:
            async with asyncio.timeout(bound):
                return await self.sleeper.asleep(self.name, sleep)
        except TimeoutError:
            return None
        except Exception as exc:
            logger.opt(exception=exc).warning(f"{self.name}: asking whether it sleeps: {exc}")
            return None

    async def _on_woke(self, fut: asyncio.Future[UnitResult], detail: str) -> None:
        if self.state != S.SLEEPING:
            answer(fut, UnitResult(False, self.state, f"not asleep ({self.state.value})", 0))
            return
        self._set(S.READY, f"awake on its own: {detail}")
        self._record()
        if self.cfg.health is not None:
            gen = self._gen
            self._spawn("health", lambda: self._watch_health(gen), gen)
        answer(fut, UnitResult(True, self.state, detail, 0.0))
