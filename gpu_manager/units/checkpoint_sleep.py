"""`sleep: {api: cuda-checkpoint}`: sleep any CUDA process in place, through the driver
(gpu_manager/checkpoint): every GPU pid of the service is locked and checkpointed (its device
memory copied to host RAM, the GPU released; the process keeps running on the CPU), and at
wake restored and unlocked.

Where the checkpoint cannot be taken (driver too old, API missing, a pid refused), the sleep
fails with the reason and the plan falls back to a stop, which says why. A partial failure
is rolled back by the checkpoint layer (what was checkpointed is restored). A wake is planned
like a start: its MB are claimed and the VRAM seen free before `Restore` is called (a restore
short of VRAM can leave the process stuck for good); a restore that fails fails the wake,
and the unit stops the service and starts it cold, the one safe way out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from gpu_manager.checkpoint import Capability, Checkpointer, ProcessState, Result
from gpu_manager.config import ServiceConfig, SleepConfig
from gpu_manager.probe import Snapshot
from gpu_manager.units.sleeper import Outcome


class CheckpointSleeper:
    def __init__(self, checkpointer: Checkpointer,
                 gpu_pids: Callable[[str], Sequence[int]]) -> None:
        self.checkpointer = checkpointer
        # the service's processes that the probe sees on the GPU (one call per pid)
        self.gpu_pids = gpu_pids

    async def sleep(self, name: str, cfg: SleepConfig, requester: str,
                    reason: str) -> Outcome:
        cap = await self.checkpointer.capability()
        if not cap.capable:
            return Outcome(False, f"cuda-checkpoint is not possible here: {cap.reason}")
        pids = sorted(self.gpu_pids(name))
        if not pids:
            return Outcome(False, "cuda-checkpoint: no process of it is on the GPU (the probe "
                                  "lists none)")
        result = await self.checkpointer.checkpoint(pids, cfg.timeout_s)
        if not result.ok:
            return Outcome(False, f"cuda-checkpoint failed: {_describe(result)}")
        return Outcome(True, f"checkpointed {len(pids)} process(es) to host memory in "
                             f"{result.seconds:.2f}s", memo=tuple(map(str, pids)))

    async def wake(self, name: str, cfg: SleepConfig, memo: tuple[str, ...]) -> Outcome:
        pids = [int(p) for p in memo if p.isdigit()] or sorted(self.gpu_pids(name))
        if not pids:
            return Outcome(False, "cuda-checkpoint: no checkpointed process of it is known")
        result = await self.checkpointer.restore(pids, cfg.wake_timeout_s)
        if not result.ok:
            return Outcome(False, f"cuda-checkpoint restore failed: {_describe(result)}")
        return Outcome(True, f"restored {len(pids)} process(es) from host memory in "
                             f"{result.seconds:.2f}s")

    async def asleep(self, name: str, cfg: SleepConfig) -> bool | None:
        """Checkpointed (every GPU pid), running (none), else it cannot say."""
        pids = sorted(self.gpu_pids(name))
        if not pids:
            return None
        states = {await self.checkpointer.state(p) for p in pids}
        if states == {ProcessState.CHECKPOINTED}:
            return True
        if states == {ProcessState.RUNNING}:
            return False
        return None


def _describe(result: Result) -> str:
    parts = []
    for o in result.outcomes:
        if o.ok or o.unchanged:
            continue
        what = f"pid {o.pid}: {o.failed_call or 'refused'}"
        parts.append(f"{what} {o.error or ''} (left {o.state.value})".replace("  ", " "))
    rolled = [o.pid for o in result.outcomes if o.rolled_back]
    if rolled:
        parts.append(f"restored again: pid {', '.join(map(str, rolled))}")
    return "; ".join(parts) or "failed"


def make_checkpointer(simulated: bool, sim_dir: Path) -> Checkpointer:
    """The simulated GPU's checkpointer, or the driver's (libcuda is loaded at first use)."""
    if simulated:
        from gpu_manager.checkpoint.simulated import SimulatedCheckpointer  # noqa: PLC0415

        return SimulatedCheckpointer(sim_dir)
    from gpu_manager.checkpoint.libcuda import LibcudaCheckpointer  # noqa: PLC0415

    return LibcudaCheckpointer()


def on_gpu(pids: Sequence[int], snap: Snapshot) -> list[int]:
    """Those of `pids` that the probe lists on any card (a process without a CUDA context
    has nothing to checkpoint)."""
    listed = {p.pid for d in snap.devices for p in d.processes or ()}
    return sorted(p for p in pids if p in listed)


def why_not(cfg: ServiceConfig, cap: Capability | None) -> str | None:
    """Why `cfg`'s `cuda-checkpoint` sleep cannot be used here (None: it can, or it has
    another sleep): the driver, or a known-unsupported shape of the service."""
    if cfg.sleep is None or cfg.sleep.api != "cuda-checkpoint":
        return None
    if cfg.gpus > 1:
        return (f"tensor-parallel across {cfg.gpus} cards: cuda-checkpoint does not support "
                "multi-process NCCL")
    if cap is None:
        return None  # not checked yet: the sleep itself will say
    return None if cap.capable else f"cuda-checkpoint unavailable: {cap.reason}"
