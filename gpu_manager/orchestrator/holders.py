"""A lease's client process: found by pid and create time, so a reused pid is not it."""

from __future__ import annotations

import asyncio

import psutil

from gpu_manager.orchestrator.ledger import ClientLease

HOLDER_CHECK_S = 1.0  # how often leases with a pid are checked for their process's exit
# psutil derives a create time from the boot time, which follows the wall clock: a clock
# step (NTP, a resumed VM) moves every process's create time with it. A pid reused within
# this much of the old process's start is not told apart (a pid cycles far slower).
SAME_START_S = 2.0


def pid_created(pid: int) -> float | None:
    """The create time of `pid` on this host, None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


async def orphaned(active: list[ClientLease], timeout_s: float) -> list[ClientLease]:
    """The leases of `active` whose process (pid and create time) is gone. A look that does
    not finish within `timeout_s` finds none: their TTL still bounds them."""
    held = [x for x in active if x.pid is not None and x.pid_created is not None]
    if not held:
        return []
    try:
        async with asyncio.timeout(timeout_s):
            created = await asyncio.to_thread(
                lambda: [pid_created(x.pid) if x.pid is not None else None for x in held])
    except TimeoutError:
        return []
    return [x for x, c in zip(held, created, strict=True)
            if c is None or x.pid_created is None or abs(c - x.pid_created) > SAME_START_S]
