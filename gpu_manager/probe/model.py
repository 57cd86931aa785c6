"""Immutable, timestamped GPU snapshots. `None` always means "unknown", never 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

Source = Literal["nvml", "simulated", "declared"]


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    name: str | None
    # None: the driver cannot attribute memory (WDDM, MIG, NOT_SUPPORTED).
    used_mb: int | None
    kind: Literal["compute", "graphics", "simulated"] = "compute"
    # SM utilisation of this process over the last sampling window, in percent; None: the
    # driver gives no per-process figure (then only the device's `utilization_percent`).
    util_pct: int | None = None


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    index: int
    name: str | None = None
    uuid: str | None = None
    total_mb: int | None = None
    used_mb: int | None = None
    free_mb: int | None = None
    # Memory the driver reserves (memory info v2 only).
    reserved_mb: int | None = None
    temperature_c: int | None = None
    utilization_percent: int | None = None
    # None: the process list is unknown (not supported, or not read yet).
    processes: tuple[GpuProcess, ...] | None = None
    processes_at: float | None = None
    lost: bool = False
    error: str | None = None

    def process(self, pid: int) -> GpuProcess | None:
        for p in self.processes or ():
            if p.pid == pid:
                return p
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "uuid": self.uuid,
            "total_mb": self.total_mb, "used_mb": self.used_mb, "free_mb": self.free_mb,
            "reserved_mb": self.reserved_mb, "temperature_c": self.temperature_c,
            "utilization_percent": self.utilization_percent,
            "processes": None if self.processes is None else [
                {"pid": p.pid, "name": p.name, "memory_mb": p.used_mb, "kind": p.kind,
                 "util_pct": p.util_pct}
                for p in self.processes
            ],
            "lost": self.lost, "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    source: Source
    # time.monotonic() when the sample finished, and the matching wall-clock time.
    taken_at: float
    wall_time: float
    devices: tuple[DeviceSnapshot, ...]
    # A backend-level problem: why NVML is not used, or why this sample failed.
    error: str | None = None

    def device(self, index: int) -> DeviceSnapshot | None:
        for d in self.devices:
            if d.index == index:
                return d
        return None


class ProbeUnavailable(Exception):
    """The backend cannot be used at all (no driver, library mismatch)."""


class GpuProbe(Protocol):
    """A blocking sampler; only the poller calls it, always off the event loop."""

    source: Source

    def sample(self, processes: bool) -> Snapshot:
        """Read the GPU(s). With `processes=False` the process lists may be left None."""
        ...

    def close(self) -> None: ...
