"""The last 15 minutes of the GPU, one sample a second: what the dashboard's chart draws and
`/gpu/history` serves. A bounded ring buffer; the daemon's sampler task is its only writer."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

INTERVAL_S = 1.0
KEEP = 900  # 15 minutes at one sample a second


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # wall-clock seconds
    device: int
    total_mb: int | None
    used_mb: int | None
    foreign_mb: int | None
    services: dict[str, int]  # measured MB of each service holding some
    temperature_c: int | None
    utilization_percent: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "device": self.device, "total_mb": self.total_mb,
                "used_mb": self.used_mb, "foreign_mb": self.foreign_mb,
                "services": self.services, "temperature_c": self.temperature_c,
                "utilization_percent": self.utilization_percent}


class History:
    def __init__(self, keep: int = KEEP) -> None:
        self._samples: deque[Sample] = deque(maxlen=keep)

    def add(self, sample: Sample) -> bool:
        """Keep `sample` unless it is no newer than the last: a stalled probe repeats its
        snapshot, and two samples of one time would break `since`."""
        if self._samples and sample.at <= self._samples[-1].at:
            return False
        self._samples.append(sample)
        return True

    def since(self, at: float | None = None) -> list[Sample]:
        return [s for s in self._samples if at is None or s.at > at]

    def __len__(self) -> int:
        return len(self._samples)
