"""Checkpointing a CUDA process in place: the interface, its outcomes, the driver's vocabulary.

NVIDIA's driver (r570 / CUDA 12.8 and newer) can take any CUDA process off the GPU and put it
back: Lock waits for the work it submitted and blocks its further CUDA calls, Checkpoint copies
its device memory to host memory and releases the GPU, Restore copies it back, Unlock lets it
call CUDA again. The process keeps running on the CPU all along; a CUDA call it makes while
locked or checkpointed just blocks until the unlock.

Sharp edges every caller must plan for (see the CUDA driver API, "CUDA Checkpointing"):
- a restore that meets too little free VRAM can leave the process stuck, and only a kill
  clears that: make room BEFORE calling restore;
- one pid per driver call: a server made of several GPU processes needs each of them toggled;
- multi-process NCCL / tensor parallel, UVM (managed memory) and CUDA IPC are not supported;
- a toggle of a big process takes seconds (its memory crosses PCIe), hence the deadlines.

Every method takes a deadline. Driver calls block, so they run in threads; a call that has not
answered by the deadline is a defined outcome (`timed_out`, state UNKNOWN) and the pid stays
refused ("busy") until that call returns, since a second call could race the first inside the
driver. Such a pid is not rolled back either: once its call ends it may be LOCKED or
CHECKPOINTED, and it is the caller's to read `state()` and restore it.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import psutil

# CUresult values, from cuda.h's `enum cudaError_enum` (CUDA 12.8): the ones the checkpoint
# calls document plus a few any call can return. Used when the driver cannot name a code
# itself (no cuGetErrorName, or the simulated driver).
CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_INVALID_CONTEXT = 201
CUDA_ERROR_ILLEGAL_STATE = 401
# What cuCheckpointProcessLock returns when its timeoutMs passes (the process is left RUNNING);
# not CUDA_ERROR_TIMEOUT, which the checkpoint calls do not document.
CUDA_ERROR_NOT_READY = 600
CUDA_ERROR_NOT_SUPPORTED = 801
CUDA_ERROR_TIMEOUT = 909

ERROR_NAMES: dict[int, str] = {
    CUDA_SUCCESS: "CUDA_SUCCESS",
    CUDA_ERROR_INVALID_VALUE: "CUDA_ERROR_INVALID_VALUE",
    CUDA_ERROR_OUT_OF_MEMORY: "CUDA_ERROR_OUT_OF_MEMORY",
    CUDA_ERROR_NOT_INITIALIZED: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    34: "CUDA_ERROR_STUB_LIBRARY",
    100: "CUDA_ERROR_NO_DEVICE",
    CUDA_ERROR_INVALID_CONTEXT: "CUDA_ERROR_INVALID_CONTEXT",
    CUDA_ERROR_ILLEGAL_STATE: "CUDA_ERROR_ILLEGAL_STATE",
    500: "CUDA_ERROR_NOT_FOUND",
    CUDA_ERROR_NOT_READY: "CUDA_ERROR_NOT_READY",
    800: "CUDA_ERROR_NOT_PERMITTED",
    CUDA_ERROR_NOT_SUPPORTED: "CUDA_ERROR_NOT_SUPPORTED",
    CUDA_ERROR_TIMEOUT: "CUDA_ERROR_TIMEOUT",
    999: "CUDA_ERROR_UNKNOWN",
}


def error_name(code: int) -> str:
    """`CUDA_ERROR_ILLEGAL_STATE` for 401; `unknown CUDA error` for a code we do not know
    (outcomes always show the number beside the name)."""
    return ERROR_NAMES.get(code, "unknown CUDA error")


class ProcessState(enum.Enum):
    """Where a process stands. The first four are the driver's CUprocessState values
    (cuda.h, CUDA 12.8: RUNNING=0, LOCKED=1, CHECKPOINTED=2, FAILED=3); GONE and UNKNOWN are
    ours: the process does not exist (any more), or its state could not be read (a driver
    error, a call still running past its deadline, a state number newer than this code)."""

    RUNNING = "running"
    LOCKED = "locked"
    CHECKPOINTED = "checkpointed"
    FAILED = "failed"  # an uncorrectable error during a checkpoint or restore
    GONE = "gone"
    UNKNOWN = "unknown"


DRIVER_STATES: dict[int, ProcessState] = {
    0: ProcessState.RUNNING, 1: ProcessState.LOCKED, 2: ProcessState.CHECKPOINTED,
    3: ProcessState.FAILED,
}

Call = Literal["lock", "checkpoint", "restore", "unlock", "state"]


@dataclass(frozen=True, slots=True)
class Capability:
    """Whether this host can checkpoint CUDA processes, and if not, why."""

    capable: bool
    driver: str | None  # "12.8" (the CUDA version the driver implements), "simulated"
    driver_version: int | None  # cuDriverGetVersion's number: 1000 * major + 10 * minor
    api_present: bool  # every cuCheckpointProcess* symbol resolved
    reason: str | None = None  # set exactly when not capable


@dataclass(frozen=True, slots=True)
class PidOutcome:
    """What one checkpoint or restore did to one pid, and the state it is left in."""

    pid: int
    ok: bool
    state: ProcessState  # where the pid is left, read from the driver whenever in doubt
    failed_call: Call | None = None  # the call that failed (or was refused, or timed out)
    error: str | None = None  # "CUDA_ERROR_ILLEGAL_STATE (401)", "no answer within 2 s", ...
    code: int | None = None  # the CUresult, when the driver gave one
    timed_out: bool = False  # a deadline passed: ours, or the lock's own timeoutMs
    # It was checkpointed, then restored because another pid failed (`ok` is then False).
    rolled_back: bool = False
    unchanged: bool = False  # already where the call would take it: nothing was done


@dataclass(frozen=True, slots=True)
class Result:
    """One checkpoint or restore of a set of pids: one outcome per pid, in the order given."""

    op: Literal["checkpoint", "restore"]
    outcomes: tuple[PidOutcome, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def timed_out(self) -> bool:
        return any(o.timed_out for o in self.outcomes)

    @property
    def failed(self) -> tuple[int, ...]:
        return tuple(o.pid for o in self.outcomes if not o.ok)

    def of(self, pid: int) -> PidOutcome:
        for o in self.outcomes:
            if o.pid == pid:
                return o
        raise KeyError(pid)

    def states(self) -> dict[int, ProcessState]:
        return {o.pid: o.state for o in self.outcomes}


class Driver(Protocol):
    """One blocking driver call on one pid; each returns a CUresult (0: success) and never
    raises. The signatures follow cuCheckpointProcess* (cuda.h, CUDA 12.8)."""

    def get_state(self, pid: int) -> tuple[int, int]:
        """(CUresult, CUprocessState)"""
        ...

    def lock(self, pid: int, timeout_ms: int) -> int: ...

    def checkpoint(self, pid: int) -> int: ...

    def restore(self, pid: int) -> int: ...

    def unlock(self, pid: int) -> int: ...

    def error_name(self, code: int) -> str: ...


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds no CUDA state)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def state_code(driver: Driver, pid: int) -> int:
    """GetState folded into one int for a call run in a thread: the state (>= 0), or -CUresult."""
    code, state = driver.get_state(pid)
    return state if code == CUDA_SUCCESS else -code


class Checkpointer(Protocol):
    """Takes CUDA processes off the GPU and puts them back. Every method is bounded by the
    `timeout_s` it is given; none raises for a driver's refusal: refusals are outcomes."""

    async def capability(self, timeout_s: float = 10.0) -> Capability:
        """Whether checkpoints can work here; loads the driver on first use."""
        ...

    async def state(self, pid: int, timeout_s: float = 5.0) -> ProcessState:
        """The driver's state of `pid` (GONE when no such process, UNKNOWN when unreadable)."""
        ...

    async def checkpoint(self, pids: Sequence[int], timeout_s: float, *,
                         cleanup_s: float | None = None) -> Result:
        """Lock every pid, then checkpoint every pid. All or nothing: when one fails, the
        ones already done are restored and unlocked in reverse order (within `cleanup_s`,
        default `timeout_s`, counted after the failure) and every pid's state is reported.
        A pid already CHECKPOINTED is left so (`unchanged`); one found LOCKED is
        checkpointed and, on a rollback, returned to LOCKED."""
        ...

    async def restore(self, pids: Sequence[int], timeout_s: float, *,
                      cleanup_s: float | None = None) -> Result:
        """Restore then unlock each pid, in order. A failure is reported for that pid and
        never retried; the others go on. A pid already RUNNING is `unchanged`; one found
        LOCKED is only unlocked. The caller must have made room on the GPU first.
        `cleanup_s` bounds the state reads that report a failure, after the deadline."""
        ...
