"""How gpu-manager sees the GPU: NVML, a simulated GPU, or declared budgets when degraded."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from gpu_manager.config import GpuConfig
from gpu_manager.probe.declared import DeclaredProbe
from gpu_manager.probe.model import (
    DeviceSnapshot,
    GpuProbe,
    GpuProcess,
    ProbeUnavailable,
    Snapshot,
    Source,
)
from gpu_manager.probe.poller import Poller
from gpu_manager.probe.simulated import SimulatedProbe


def make_probe(gpu: GpuConfig, sim_dir: Path) -> GpuProbe:
    """The probe `gpu.backend` asks for; NVML that fails to start degrades, loudly."""
    if gpu.backend == "simulated":
        assert gpu.total_mb is not None  # enforced by GpuConfig
        return SimulatedProbe(sim_dir, gpu.total_mb, gpu.device, gpu.release_delay_ms,
                              gpu.simulated_poll_cost_ms, gpu.simulated_slow_poll_ms,
                              {d.index: d.total_mb or 0 for d in gpu.managed})
    from gpu_manager.probe.nvml import NvmlProbe  # noqa: PLC0415 - simulated hosts skip pynvml

    probe = NvmlProbe()
    try:
        probe.init()
    except ProbeUnavailable as exc:
        logger.warning(
            f"!!! {exc}. Running DEGRADED on declared budgets "
            f"(gpu.total_mb={gpu.total_mb}); VRAM use is NOT measured !!!"
        )
        return DeclaredProbe(gpu.total_mb, gpu.device, str(exc),
                             {d.index: d.total_mb for d in gpu.managed})
    return probe


def make_poller(gpu: GpuConfig, probe: GpuProbe, sample_timeout_s: float = 5.0) -> Poller:
    return Poller(
        probe, interval_s=gpu.poll_interval_s, process_interval_s=gpu.process_poll_interval_s,
        fast_interval_s=gpu.fast_poll_interval_s, reserve_mb=gpu.reserve_mb, device=gpu.device,
        sample_timeout_s=sample_timeout_s,
    )


__all__ = [
    "DeclaredProbe",
    "DeviceSnapshot",
    "GpuProbe",
    "GpuProcess",
    "Poller",
    "ProbeUnavailable",
    "SimulatedProbe",
    "Snapshot",
    "Source",
    "make_poller",
    "make_probe",
]
