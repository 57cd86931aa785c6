"""The pure preemption planner (no I/O): see `core.plan`."""

from gpu_manager.planner.core import FOREIGN, choose_victims, usage_mb, used_mb
from gpu_manager.planner.model import (
    RELEASES,
    Blocker,
    DeviceBudget,
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
from gpu_manager.planner.place import plan

__all__ = [
    "FOREIGN",
    "RELEASES",
    "Blocker",
    "DeviceBudget",
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
