"""Checkpointing CUDA processes in place (issue 24): the driver's cuCheckpointProcess* calls,
or the simulated GPU's equivalent. Not wired into the daemon yet."""

from gpu_manager.checkpoint.base import (
    Capability,
    Checkpointer,
    PidOutcome,
    ProcessState,
    Result,
)

__all__ = ["Capability", "Checkpointer", "PidOutcome", "ProcessState", "Result"]
