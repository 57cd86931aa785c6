"""Service units: one owner task per service, drivers for native processes and containers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gpu_manager.config import DockerService, NativeService, ServiceConfig
from gpu_manager.units.drivers.base import Driver, DriverError, ExitInfo
from gpu_manager.units.drivers.docker import DockerDriver, DockerEngine
from gpu_manager.units.drivers.native import NativeDriver
from gpu_manager.units.events import Event, EventBus
from gpu_manager.units.health import HealthChecker
from gpu_manager.units.states import HOLDS_GPU, RUNNING, ServiceState
from gpu_manager.units.unit import RestartPolicy, Unit, UnitResult


def make_driver(
    name: str, cfg: ServiceConfig, *, log_dir: Path, docker: DockerEngine,
    extra_env: Mapping[str, str] | None = None,
) -> Driver:
    if isinstance(cfg, NativeService):
        return NativeDriver(name, cfg, log_dir, extra_env)
    assert isinstance(cfg, DockerService)
    return DockerDriver(name, cfg, docker)


__all__ = [
    "HOLDS_GPU",
    "RUNNING",
    "DockerDriver",
    "DockerEngine",
    "Driver",
    "DriverError",
    "Event",
    "EventBus",
    "ExitInfo",
    "HealthChecker",
    "NativeDriver",
    "RestartPolicy",
    "ServiceState",
    "Unit",
    "UnitResult",
    "make_driver",
]
