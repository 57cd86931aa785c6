"""The helper tasks a unit's owner loop spawns: the start sequence (launch, then health checks
until ready or the start timeout) and the exit and health watchers. They only post messages;
the owner loop decides (units/unit.py, units/sleepwake.py)."""

from __future__ import annotations

import asyncio
import time

from gpu_manager.units.drivers.base import DriverError
from gpu_manager.units.messages import Exited, Health, Launched, Ready, StartFailed
from gpu_manager.units.owner import UnitOwner


class Watchers(UnitOwner):
    async def _start_sequence(self, gen: int, launch: bool) -> None:
        deadline = self._start_began + self.cfg.start_timeout_s
        bound = self.start_sequence_bound_s
        try:
            async with asyncio.timeout(bound):
                await self._start_steps(gen, launch, deadline)
        except TimeoutError:
            self._post(StartFailed(gen, f"start did not finish within {bound:g}s "
                                        f"(last: {self.health_detail or 'no answer'})"))

    async def _start_steps(self, gen: int, launch: bool, deadline: float) -> None:
        if launch:
            try:
                await self._driver(f"launching {self.name}", self.driver.start(),
                                   self.cfg.start_timeout_s)
            except DriverError as exc:
                self._post(StartFailed(gen, str(exc)))
                return
            self._post(Launched(gen))
        health = self.cfg.health
        if health is None:
            self._post(Ready(gen, "started (no health check configured)"))
            return
        await asyncio.sleep(0.01)  # first check within 50 ms of the launch
        while True:
            ok, detail = await self._health.check(health)
            self.health_detail = detail
            if ok:
                self._post(Ready(gen, f"healthy ({detail})"))
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._post(StartFailed(
                    gen, f"not healthy after {self.cfg.start_timeout_s:g}s (last: {detail})"))
                return
            await asyncio.sleep(min(health.startup_interval_s, left))

    async def _watch_exit(self, gen: int) -> None:
        info = await self.driver.wait_exit()
        self._post(Exited(gen, info))

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
            self._post(Health(gen, ok, detail))
