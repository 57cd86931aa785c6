"""Degraded mode: NVML is unavailable, so report only the declared total and say why.

Never pretends: used and free are unknown (None), `source` is "declared", and the NVML error
travels with every snapshot so `/gpu/status` and `/ready` can show it. The planner then works
from declared budgets against `gpu.total_mb`.
"""

from __future__ import annotations

import time

from gpu_manager.probe.model import DeviceSnapshot, Snapshot, Source


class DeclaredProbe:
    source: Source = "declared"

    def __init__(self, total_mb: int | None, device: int, reason: str,
                 devices: dict[int, int | None] | None = None) -> None:
        self.total_mb = total_mb
        self.device = device
        self.devices = dict(devices or {device: total_mb})
        self.reason = reason

    def sample(self, processes: bool = True) -> Snapshot:
        now = time.monotonic()
        devs = tuple(DeviceSnapshot(index=i, name="declared", total_mb=total, error=self.reason)
                     for i, total in sorted(self.devices.items()))
        return Snapshot("declared", now, time.time(), devs, error=self.reason)

    def close(self) -> None:
        pass
