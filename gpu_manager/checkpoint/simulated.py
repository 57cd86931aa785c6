"""Checkpointing on the simulated GPU: a stand-in's registration plays the driver's part.

A checkpoint of a pid moves its registration's MB to host memory (`host_mb`, `mb` 0) after
`checkpoint_s_per_gb` per GB (the copy over PCIe: the VRAM is held until the copy is done); a
restore takes them back, then waits `restore_s_per_gb` per GB. The state lives in the registry
folder (gpu_manager/sim/registry.py), so a restarted daemon sees what it checkpointed, and the
simulated probe shows the freed VRAM at once. Lock and unlock are immediate: a stand-in has no
GPU work in flight to wait for. While locked or checkpointed, a stand-in's own allocations
(its sleep/wake API resizing its registration) block until the unlock, as CUDA calls do.

One deliberate difference from the real driver: a restore that does not fit on the card is
refused (CUDA_ERROR_OUT_OF_MEMORY) and the process stays CHECKPOINTED, free to be restored
again once there is room; the real driver can leave such a process stuck, cleared only by a
kill. The simulation shows that the caller ran out of room, not what the driver then does.

Codes: no registration or a dead process answers CUDA_ERROR_INVALID_VALUE (a pid the driver
does not know); a call in the wrong state answers CUDA_ERROR_ILLEGAL_STATE, as documented.
"""

from __future__ import annotations

import time
from pathlib import Path

from gpu_manager.checkpoint.base import (
    CUDA_ERROR_ILLEGAL_STATE,
    CUDA_ERROR_INVALID_VALUE,
    CUDA_ERROR_OUT_OF_MEMORY,
    CUDA_SUCCESS,
    Capability,
    error_name,
)
from gpu_manager.checkpoint.sequence import DriverCheckpointer
from gpu_manager.sim.registry import (
    CHECKPOINTED,
    LOCKED,
    RUNNING,
    CudaStateError,
    SimRegistry,
    SimulatedOOM,
    process_alive,
)

DEFAULT_CHECKPOINT_S_PER_GB = 0.05  # a few GB/s, about what a real checkpoint moves
DEFAULT_RESTORE_S_PER_GB = 0.05
# CUprocessState numbers (cuda.h, CUDA 12.8) of the registry's state names
STATE_NUMBERS = {RUNNING: 0, LOCKED: 1, CHECKPOINTED: 2}


class SimulatedDriver:
    """The `Driver` calls on the simulated GPU's registry."""

    def __init__(self, registry: SimRegistry, checkpoint_s_per_gb: float,
                 restore_s_per_gb: float) -> None:
        self.registry = registry
        self.checkpoint_s_per_gb = checkpoint_s_per_gb
        self.restore_s_per_gb = restore_s_per_gb

    def get_state(self, pid: int) -> tuple[int, int]:
        try:
            reg = self.registry.get(pid)
        except LookupError:
            return CUDA_ERROR_INVALID_VALUE, -1
        if reg.dead_since is not None or not process_alive(reg.pid, reg.create_time):
            return CUDA_ERROR_INVALID_VALUE, -1
        return CUDA_SUCCESS, STATE_NUMBERS.get(reg.cuda_state, -1)

    def _step(self, pid: int, expect: str, to: str) -> int:
        try:
            self.registry.cuda_step(pid, expect, to)
        except CudaStateError:
            return CUDA_ERROR_ILLEGAL_STATE
        except SimulatedOOM:
            return CUDA_ERROR_OUT_OF_MEMORY
        except LookupError:
            return CUDA_ERROR_INVALID_VALUE
        return CUDA_SUCCESS

    def _copy_s(self, pid: int, s_per_gb: float) -> float:
        """Seconds to copy the VRAM `pid` holds, on every card it holds it on."""
        try:
            reg = self.registry.get(pid)
        except LookupError:
            return 0.0
        return reg.mb * len(reg.devices) / 1024 * s_per_gb

    def lock(self, pid: int, timeout_ms: int) -> int:
        return self._step(pid, RUNNING, LOCKED)

    def checkpoint(self, pid: int) -> int:
        code, state = self.get_state(pid)
        if code != CUDA_SUCCESS:
            return code
        if state != STATE_NUMBERS[LOCKED]:
            return CUDA_ERROR_ILLEGAL_STATE
        time.sleep(self._copy_s(pid, self.checkpoint_s_per_gb))  # the copy to the host
        return self._step(pid, LOCKED, CHECKPOINTED)

    def restore(self, pid: int) -> int:
        code = self._step(pid, CHECKPOINTED, LOCKED)  # the VRAM is taken first, then filled
        if code == CUDA_SUCCESS:
            time.sleep(self._copy_s(pid, self.restore_s_per_gb))
        return code

    def unlock(self, pid: int) -> int:
        return self._step(pid, LOCKED, RUNNING)

    def error_name(self, code: int) -> str:
        return error_name(code)


class SimulatedCheckpointer(DriverCheckpointer):
    """Checkpoints stand-ins registered in the simulated GPU's registry at `sim_dir`."""

    def __init__(self, sim_dir: Path,
                 checkpoint_s_per_gb: float = DEFAULT_CHECKPOINT_S_PER_GB,
                 restore_s_per_gb: float = DEFAULT_RESTORE_S_PER_GB) -> None:
        super().__init__(self._load)
        self.registry = SimRegistry(sim_dir)
        self.checkpoint_s_per_gb = checkpoint_s_per_gb
        self.restore_s_per_gb = restore_s_per_gb

    def _load(self) -> tuple[SimulatedDriver, Capability]:
        driver = SimulatedDriver(self.registry, self.checkpoint_s_per_gb,
                                 self.restore_s_per_gb)
        return driver, Capability(True, "simulated", None, True)
