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
    # The outcome is unknown (the unit did not answer, a driver call failed): not the same
    # as "no" when the question was "is it still running?".
    unknown: bool = False
