"""Service states, their groups and the allowed transitions; no dependencies (the supervisor
`states.py` habit, and llama-swap's `isValidTransition`).

A transition not in `TRANSITIONS` is a bug in the owner loop, not something to tolerate: the
unit refuses it (raises `InvalidTransition`), the owner loop logs it with its traceback and
moves the unit to a state that is always reachable (`failed`), so the bug shows instead of
leaving a unit in a state that nothing will ever move it out of.
"""

from __future__ import annotations

from enum import StrEnum


class ServiceState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    STOPPING = "stopping"
    FAILED = "failed"
    # The process lives, its model is off the GPU (it holds only its residual: a CUDA
    # context, buffers); waking takes the VRAM back without a cold start.
    SLEEPING = "sleeping"
    WAKING = "waking"


S = ServiceState

# States in which the service may hold VRAM: the planner counts these as running.
# A sleeping one holds its residual, counted as such.
HOLDS_GPU = frozenset({S.STARTING, S.READY, S.UNHEALTHY, S.STOPPING, S.SLEEPING, S.WAKING})
# States with a live process/container the unit is responsible for.
RUNNING = frozenset({S.STARTING, S.READY, S.UNHEALTHY, S.SLEEPING, S.WAKING})
# States a unit may only pass through: each has a deadline (start, wake or stop timeout).
TRANSIENT = frozenset({S.STARTING, S.STOPPING, S.WAKING})

TRANSITIONS: dict[ServiceState, frozenset[ServiceState]] = {
    # stopped -> stopping: a stop of something still running although the unit thought not
    # (a leftover of an adoption); stopped -> failed: the restart limit was hit.
    # stopped -> sleeping: adopted after a daemon restart, as it was left: asleep.
    S.STOPPED: frozenset({S.STARTING, S.STOPPING, S.FAILED, S.SLEEPING}),
    # starting -> stopped: it exited cleanly before it was ever healthy.
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING, S.STOPPED}),
    S.READY: frozenset({S.UNHEALTHY, S.STOPPING, S.STOPPED, S.FAILED, S.SLEEPING}),
    S.UNHEALTHY: frozenset({S.READY, S.STOPPING, S.STOPPED, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING, S.STOPPED}),
    # sleeping -> ready: it took its VRAM back on its own (Ollama and ComfyUI reload on the
    # next request); -> stopped/failed: the process exited while asleep.
    S.SLEEPING: frozenset({S.WAKING, S.READY, S.STOPPING, S.STOPPED, S.FAILED}),
    # waking -> sleeping: the wake was refused (a CUDA OOM) and it is still asleep.
    S.WAKING: frozenset({S.READY, S.SLEEPING, S.STOPPING, S.STOPPED, S.FAILED}),
}


class InvalidTransition(RuntimeError):
    def __init__(self, service: str, old: ServiceState, new: ServiceState) -> None:
        super().__init__(f"{service}: {old.value} -> {new.value} is not an allowed transition")
        self.old, self.new = old, new


def allowed(old: ServiceState, new: ServiceState) -> bool:
    return new in TRANSITIONS[old]
