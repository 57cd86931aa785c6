"""The simulated GPU: memory in use is what live stand-in processes registered, plus foreign;
each process's utilisation is the load its stand-in recorded (gpu_manager/sim/serving.py)."""

from __future__ import annotations

import time
from pathlib import Path

from gpu_manager.probe.model import DeviceSnapshot, GpuProcess, Snapshot, Source
from gpu_manager.sim.registry import (
    DEFAULT_RELEASE_DELAY_MS,
    Registration,
    SimRegistry,
    sim_uuid,
)


class SimulatedProbe:
    source: Source = "simulated"

    def __init__(
        self, sim_dir: Path, total_mb: int, device: int = 0,
        release_delay_ms: int = DEFAULT_RELEASE_DELAY_MS,
        poll_cost_ms: float = 0.0, slow_poll_ms: float = 0.0,
        devices: dict[int, int] | None = None,
    ) -> None:
        self.poll_cost_s = poll_cost_ms / 1000
        self.slow_poll_s = slow_poll_ms / 1000
        self._last_slow = time.monotonic()
        self.registry = SimRegistry(sim_dir)
        self.total_mb = total_mb
        self.device = device
        # index -> total MB of each simulated card
        self.devices = dict(devices or {device: total_mb})
        self.release_delay_s = release_delay_ms / 1000
        # Stand-ins read this to refuse allocations that would not fit, like a real GPU.
        self.registry.write_gpu(total_mb, release_delay_ms, device, self.devices)

    def sample(self, processes: bool = True) -> Snapshot:
        # The injected cost blocks this (probe) thread only, as a slow NVML call would.
        cost = self.poll_cost_s
        if self.slow_poll_s and time.monotonic() - self._last_slow >= 1.0:
            self._last_slow = time.monotonic()
            cost += self.slow_poll_s
        if cost:
            time.sleep(cost)
        # Reading the registry is cheap, so the process list is always fresh.
        active = self.registry.active(self.release_delay_s)
        foreign = self.registry.foreign()
        now, wall = time.monotonic(), time.time()
        return Snapshot("simulated", now, wall, tuple(
            self._device(index, total, active, foreign.get(index, 0), now, wall)
            for index, total in sorted(self.devices.items())))

    @staticmethod
    def _device(index: int, total: int, active: list[Registration], foreign: int,
                now: float, wall: float) -> DeviceSnapshot:
        regs = [r for r in active if index in r.devices]
        used = sum(r.mb for r in regs) + foreign
        return DeviceSnapshot(
            index=index,
            name="Simulated GPU",
            uuid=sim_uuid(index),
            total_mb=total,
            used_mb=used,
            free_mb=max(total - used, 0),
            # the load each stand-in recorded (requests in flight, /sim/busy), else 0: the
            # simulated GPU always knows, unlike a driver that cannot sample per process
            processes=tuple(GpuProcess(r.pid, r.name, r.mb, "simulated", r.util_pct(wall))
                            for r in regs),
            processes_at=now,
        )

    def close(self) -> None:
        pass
