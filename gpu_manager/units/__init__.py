"""Service units: one owner task per service, drivers for native processes and containers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gpu_manager.config import DockerService, NativeService, ServiceConfig
from gpu_manager.units.drivers.base import Driver, DriverError, ExitInfo
from gpu_manager.units.drivers.native import NativeDriver
from gpu_manager.units.events import Event, EventBus
from gpu_manager.units.health import HealthChecker
from gpu_manager.units.restart import RestartPolicy
from gpu_manager.units.result import UnitResult
from gpu_manager.units.sleeper import HttpSleeper, Outcome, Sleeper
from gpu_manager.units.states import HOLDS_GPU, RUNNING, TRANSIENT, ServiceState
from gpu_manager.units.unit import Unit


def make_driver(
    name: str, cfg: ServiceConfig, *, log_dir: Path, docker: Callable[[], Any],
    extra_env: Mapping[str, str] | None = None, log_max_bytes: int = 10 * 1024 * 1024,
    log_backups: int = 3,
) -> Driver:
    """`docker` gives the shared DockerEngine; it is only called for a docker service."""
    if isinstance(cfg, NativeService):
        return NativeDriver(name, cfg, log_dir, extra_env, log_max_bytes, log_backups)
    assert isinstance(cfg, DockerService)
    from gpu_manager.units.drivers.docker import DockerDriver  # noqa: PLC0415

    return DockerDriver(name, cfg, docker())


def __getattr__(name: str) -> Any:
    # The Docker SDK (with requests) costs ~0.2 s to import; hosts without containers skip it.
    if name in ("DockerDriver", "DockerEngine"):
        from gpu_manager.units.drivers import docker  # noqa: PLC0415

        return getattr(docker, name)
    raise AttributeError(name)


__all__ = [
    "HOLDS_GPU",
    "RUNNING",
    "TRANSIENT",
    "DockerDriver",
    "DockerEngine",
    "Driver",
    "DriverError",
    "Event",
    "EventBus",
    "ExitInfo",
    "HealthChecker",
    "HttpSleeper",
    "NativeDriver",
    "Outcome",
    "RestartPolicy",
    "ServiceState",
    "Sleeper",
    "Unit",
    "UnitResult",
    "make_driver",
]
