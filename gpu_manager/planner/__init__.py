"""The pure preemption planner (no I/O): see `core.plan`."""

from gpu_manager.planner.core import FOREIGN, choose_victims, plan, usage_mb, used_mb
from gpu_manager.planner.model import (
    Blocker,
    ObservedState,
    PhaseSpec,
    Plan,
    PlannerInventory,
    PreparePhase,
    Prewarm,
    Refusal,
    Request,
    ServiceSpec,
    SleepService,
    StartService,
    Step,
    StopAll,
    StopService,
)

__all__ = [
    "FOREIGN",
    "Blocker",
    "ObservedState",
    "PhaseSpec",
    "Plan",
    "PlannerInventory",
    "PreparePhase",
    "Prewarm",
    "Refusal",
    "Request",
    "ServiceSpec",
    "SleepService",
    "StartService",
    "Step",
    "StopAll",
    "StopService",
    "choose_victims",
    "plan",
    "usage_mb",
    "used_mb",
]
