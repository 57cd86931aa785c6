"""What the requests waiting for a start are answered when it does not happen, and how a
refusal is read (which blockers are requests in flight, and whether they would make room)."""

from __future__ import annotations

from collections.abc import Iterable

from gpu_manager.frontdoor.errors import DoorError
from gpu_manager.lock import LockHeld, LockLost, LockUnavailable
from gpu_manager.orchestrator import OperationError
from gpu_manager.planner import IN_FLIGHT

# Retry-After (s): a refused start waits for something else to finish.
RETRY_REFUSED_S = 5.0


def start_error(name: str, exc: Exception) -> DoorError:
    """What the requests waiting for a start that did not happen are answered."""
    if isinstance(exc, OperationError):
        status = 503 if exc.code in ("insufficient_vram", "needed_by_phase", "lock_held",
                                     "queue_timeout", "lock_unavailable", "lock_lost",
                                     "shutting_down", "unmanaged_device") else 502
        return DoorError(status, exc.code, f"{name} could not be started for this request: "
                         f"{exc.detail}", retry_after=RETRY_REFUSED_S,
                         **{k: v for k, v in exc.extra.items()
                            if k in ("blockers", "short_mb", "plan")})
    if isinstance(exc, LockHeld):
        return DoorError(503, "lock_held", f"{name} could not be started: {exc}",
                         retry_after=RETRY_REFUSED_S, holder=exc.holder)
    if isinstance(exc, LockUnavailable | LockLost):
        return DoorError(503, "lock_unavailable", f"{name} could not be started: {exc}",
                         retry_after=RETRY_REFUSED_S)
    return DoorError(502, "start_failed", f"{name} could not be started (internal error; see "
                     "the daemon's log)", retry_after=RETRY_REFUSED_S)


def in_flight(blockers: Iterable[tuple[str, int]], short_mb: int) -> bool:
    """Whether a refusal names blockers the planner kept for their requests in flight, and
    those would make the room it lacks once idle (else waiting for them helps nobody: the
    refusal is the answer now, and they need not yield)."""
    mbs = [mb for reason, mb in blockers if reason.endswith(IN_FLIGHT)]
    return bool(mbs) and sum(mbs) >= short_mb


def mb_of(value: object) -> int:
    return value if isinstance(value, int) else 0
