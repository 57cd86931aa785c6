"""What a unit's owner loop receives: one dataclass per message, handled in one `match`
(units/unit.py), so a wrong or unknown message is a type error, not a string that fails
at run time.

`Ask`s come from callers, who wait on `fut` for the answer (bounded: a caller that gives up
cancels it, and the loop drops a message whose caller is gone instead of acting on it
later). The rest come from the unit's own helper tasks (start sequence, watchers, restart
timer), stamped with the generation of the instance they watch, so news about an instance
that has since been stopped or replaced is dropped.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from gpu_manager.config import ServiceConfig
from gpu_manager.units.drivers.base import Driver, ExitInfo
from gpu_manager.units.result import UnitResult


@dataclass(frozen=True, slots=True)
class Ask:
    fut: asyncio.Future[UnitResult]


@dataclass(frozen=True, slots=True)
class EnsureReady(Ask):
    pass


@dataclass(frozen=True, slots=True)
class Stop(Ask):
    reason: str


@dataclass(frozen=True, slots=True)
class Sleep(Ask):
    reason: str
    requester: str
    deep: bool = False  # by its ladder's cuda-checkpoint, not its sleep API


@dataclass(frozen=True, slots=True)
class Woke(Ask):
    detail: str


@dataclass(frozen=True, slots=True)
class Adopt(Ask):
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reconfigure(Ask):
    cfg: ServiceConfig
    driver: Driver


@dataclass(frozen=True, slots=True)
class Crashed:
    key: str
    gen: int
    exc: Exception


@dataclass(frozen=True, slots=True)
class Launched:
    gen: int


@dataclass(frozen=True, slots=True)
class Ready:
    gen: int
    detail: str


@dataclass(frozen=True, slots=True)
class StartFailed:
    gen: int
    reason: str


@dataclass(frozen=True, slots=True)
class Exited:
    gen: int
    info: ExitInfo


@dataclass(frozen=True, slots=True)
class Health:
    gen: int
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Restart:
    gen: int
    allowed: bool


@dataclass(frozen=True, slots=True)
class Woken:
    gen: int
    detail: str


@dataclass(frozen=True, slots=True)
class WakeRefused:
    gen: int
    detail: str


Message = (EnsureReady | Stop | Sleep | Woke | Adopt | Reconfigure | Crashed | Launched
           | Ready | StartFailed | Exited | Health | Restart | Woken | WakeRefused)
