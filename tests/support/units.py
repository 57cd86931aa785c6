"""Build real units for tests: real drivers, real health checks, a real event bus."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gpu_manager.config import DockerService, NativeService
from gpu_manager.units import (
    DockerDriver,
    DockerEngine,
    EventBus,
    HealthChecker,
    NativeDriver,
    RestartPolicy,
    ServiceState,
    Unit,
)

ROOT = Path(__file__).resolve().parent.parent.parent


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bus = EventBus()
        self.health = HealthChecker()
        self.engine = DockerEngine()
        self.units: list[Unit] = []
        self.records: dict[str, dict[str, Any] | None] = {}

    def native(self, name: str, command: list[str], *, policy: RestartPolicy | None = None,
               **cfg: Any) -> Unit:
        svc = NativeService.model_validate({"type": "native", "vram_mb": 0, "command": command,
                                            "cwd": str(ROOT), **cfg})
        driver = NativeDriver(name, svc, self.tmp / "logs",
                              {"GPU_MANAGER_SIM_DIR": str(self.tmp / "sim")})
        return self._unit(name, svc, driver, policy)

    def docker(self, name: str, *, policy: RestartPolicy | None = None, **cfg: Any) -> Unit:
        svc = DockerService.model_validate({"type": "docker", "vram_mb": 0, **cfg})
        return self._unit(name, svc, DockerDriver(name, svc, self.engine), policy)

    def _unit(self, name: str, svc: Any, driver: Any, policy: RestartPolicy | None) -> Unit:
        unit = Unit(name, svc, driver, self.health, self.bus,
                    on_record=self.records.__setitem__, policy=policy)
        self.units.append(unit)
        return unit

    def states(self, name: str) -> list[tuple[str, float]]:
        return [(e.data["state"], e.at) for e in self.bus.history
                if e.kind == "state" and e.service == name]

    async def wait_state(self, unit: Unit, state: ServiceState, timeout: float) -> float:
        """Wait until `unit` is in `state`; returns the monotonic time it got there."""
        deadline = time.monotonic() + timeout
        async with self.bus.subscribe() as q:
            while unit.state != state:
                left = deadline - time.monotonic()
                assert left > 0, f"{unit.name} never reached {state} (is {unit.state}: " \
                                 f"{unit.reason})"
                try:
                    await asyncio.wait_for(q.get(), left)
                except TimeoutError:
                    continue
        return time.monotonic()


@asynccontextmanager
async def harness(tmp: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp)
    try:
        yield h
    finally:
        for unit in h.units:
            if unit.driver.running():
                await unit.stop("test teardown")
            await unit.close()
        await h.health.aclose()
        h.engine.close()


def workload(port: int, *extra: str, mb: int = 10) -> list[str]:
    return ["{python}", "-m", "gpu_manager.sim.workload", "--vram-mb", str(mb), "--port",
            str(port), *extra]


def health(port: int, **extra: Any) -> dict[str, Any]:
    return {"url": f"http://127.0.0.1:{port}/health", "timeout_s": 1, "interval_s": 0.2, **extra}


Check = Callable[[], bool]
