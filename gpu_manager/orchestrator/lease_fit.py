"""What a lease could get: the most a card can give, and the plan an acquire would run now."""

from __future__ import annotations

from gpu_manager.config import LeaseConfig
from gpu_manager.orchestrator.core import Orchestrator
from gpu_manager.orchestrator.ledger import lease_name
from gpu_manager.planner import Plan, PlannerInventory, Refusal, ServiceSpec, StartService, plan


def card_budget(orch: Orchestrator, device: int | None) -> int:
    """The most one lease can get: the card's total less its reserve (`device`), or the
    largest card's (any)."""
    observed = orch.observed()
    if not observed.devices:  # one card
        return observed.total_mb - observed.reserve_mb
    return max((c.total_mb - c.reserve_mb for i, c in observed.devices.items()
                if device is None or i == device), default=0)


async def fit(orch: Orchestrator, cfg: LeaseConfig, priority: int, vram_mb: int | None,
              device: int | None, label: str) -> Plan | Refusal | str:
    """What an acquire of `vram_mb` at `priority` (the services' scale) would do now (a
    fleet asks every host before it places one): the plan (its preemptions, the room left),
    the planner's refusal, or why no wait could ever make it fit. Pure: nothing is
    reserved, nothing queued; the lease is planned as a hypothetical unstoppable service."""
    budget = card_budget(orch, device)
    mb = vram_mb if vram_mb is not None else cfg.default_vram_mb
    mb = budget if mb is None else mb
    if 0 < budget < mb:
        return f"{mb} MB is more than this GPU can ever give ({budget} MB: its total less the " \
               "reserve)"
    await orch.refresh_pids()
    inv = orch.planner_inventory()
    name = lease_name(label)
    spec = ServiceSpec(name, mb, priority, preemptible=False, stoppable=False,
                       devices=None if device is None else (device,))
    return plan(PlannerInventory({**inv.services, name: spec}, inv.phases), orch.observed(),
                StartService(name))
