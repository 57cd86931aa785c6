"""What a unit answers to a command."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_manager.units.states import ServiceState


@dataclass(frozen=True, slots=True)
class UnitResult:
    ok: bool
    state: ServiceState
    reason: str
    duration_s: float
