"""The last 15 minutes of each managed GPU, one sample a second: what the dashboard's chart
draws and `/gpu/history` serves. A bounded ring buffer per card; the daemon's sampler task is
its only writer."""

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
        self.keep = keep
        self._cards: dict[int, deque[Sample]] = {}

    def add(self, sample: Sample) -> bool:
        """Keep `sample` unless it is no newer than its card's last: a stalled probe repeats
        its snapshot, and two samples of one time would break `since`."""
        kept = self._cards.setdefault(sample.device, deque(maxlen=self.keep))
        if kept and sample.at <= kept[-1].at:
            return False
        kept.append(sample)
        return True

    def since(self, at: float | None = None, device: int | None = None) -> list[Sample]:
        """Samples after `at` (of `device`, or of every card), oldest first."""
        cards = [self._cards.get(device, deque())] if device is not None \
            else [self._cards[d] for d in sorted(self._cards)]
        out = [s for kept in cards for s in kept if at is None or s.at > at]
        return sorted(out, key=lambda s: (s.at, s.device)) if len(cards) > 1 else out

    def __len__(self) -> int:
        return sum(len(kept) for kept in self._cards.values())
