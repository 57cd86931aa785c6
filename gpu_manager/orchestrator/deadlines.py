"""The deadlines of a plan and of the calls to the lock backend: what bounds an operation.

Bounds, all derived from the inventory and settings: a unit answers a stop within its stop
timeout plus the kill grace, a start within its start timeout (plus the stops around it); a
sleep within its `sleep.timeout_s`, and its release is confirmed on the GPU within the same
again; a wake within `wake_timeout_s` plus the start timeout; the reclaim wait within
`reclaim_timeout_s`; lock calls within `bounds.lock_io_s` (all margins: gpu_manager/bounds.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from gpu_manager.lock import LockUnavailable
from gpu_manager.orchestrator.view import GpuView
from gpu_manager.planner import Plan, PreparePhase, Request, StartService


def plan_bound(view: GpuView, plan: Plan) -> float:
    """The longest a plan may take when every step uses its whole deadline."""
    b = view.bounds
    total = b.lock_io_s * 4 + b.pids_s + 2.0 + 2.0  # lock checks, pid refresh, a fresh poll
    for step in plan.steps:
        unit = view.units.get(step.service)
        if unit is None:
            continue
        sleep = unit.cfg.sleep
        if step.action in ("stop", "sleep"):  # the front door's drain comes first
            total += view.drain_bound_s(step.service)
        if step.action == "stop":
            total += unit.stop_bound_s + b.pids_s
        elif step.action == "sleep":
            # the call, its confirmation on the GPU, the stop when it frees nothing
            total += unit.sleep_bound_s + (sleep.timeout_s if sleep else 0.0) \
                + unit.stop_bound_s + b.pids_s
        else:
            # a reclaim wait, a second one after sleeps fell back to stops, the start (a wake
            # that fails: the stop of what it woke and a cold start)
            total += 2 * view.reclaim_timeout_s + unit.start_bound_s
            if step.action == "wake":
                total += unit.wake_bound_s + unit.stop_bound_s
    # a wanted service found starting (no step of its own) is joined: its start's bound
    wanted = wanted_by(view, plan.request)
    stepped = {s.service for s in plan.steps}
    total += max((max(u.start_bound_s, u.wake_bound_s) for n in wanted if n not in stepped
                  and (u := view.units.get(n)) is not None), default=0.0)
    return total


def wanted_by(view: GpuView, request: Request) -> list[str]:
    """The services a request wants ready when it answers: a start's, a phase's."""
    if isinstance(request, StartService):
        return [request.name]
    if isinstance(request, PreparePhase) and request.phase in view.inventory.phases:
        return list(view.inventory.phases[request.phase].services)
    return []


async def lock_call(what: str, aw: Awaitable[Any], bound: float) -> None:
    """A call to the lock backend under `bound`; expiry is LockUnavailable."""
    try:
        async with asyncio.timeout(bound):
            await aw
    except TimeoutError as exc:
        raise LockUnavailable(f"the lock backend did not answer {what} within "
                              f"{bound:g}s") from exc
