"""`--sim-vram-mb`: what the training service holds on gpu-manager's simulated GPU.

N MB while awake and the residual while asleep, through gpu_manager.sim.memory's ModelMemory
(the stand-in workloads' own logic): a wake that does not fit is refused as CUDA refuses an
allocation. Imported only with that option, so the service itself needs no gpu-manager.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer import OutOfMemory

from gpu_manager.paths import sim_dir
from gpu_manager.sim.memory import DeviceOOM, ModelMemory, SimulatedBackend
from gpu_manager.sim.registry import SimRegistry, SimulatedOOM


class SimGpu:
    def __init__(self, mb: int, residual_mb: int, root: Path | None, name: str) -> None:
        registry = SimRegistry(root or sim_dir())
        try:
            registry.register(os.getpid(), mb, name)
        except SimulatedOOM as exc:
            raise OutOfMemory(str(exc)) from exc
        self.memory = ModelMemory(SimulatedBackend(registry), {"model": mb - residual_mb},
                                  residual_mb)

    def sleep(self) -> None:
        self.memory.sleep()

    def wake(self) -> None:
        try:
            self.memory.wake()
        except DeviceOOM as exc:
            raise OutOfMemory(str(exc)) from exc

    def held_mb(self) -> int:
        return self.memory.held_mb()
