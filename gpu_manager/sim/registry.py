"""The simulated GPU's memory registry: stand-in workloads register their pid and MB here.

Usage is derived from what really runs, never from what the daemon believes it started: a
registration counts only while its process (pid + create time) is alive and not a zombie, and
for `release_delay_s` after its death is first seen, to model the driver's teardown. The death
time is written back into the registration so that every reader (the probe, a workload checking
for room before it "allocates") applies the same rule. All changes happen under one flock.

Layout of the folder:
- `gpu.json`: {"total_mb", "release_delay_ms", "device", "devices": {"<index>": total_mb}},
  written by the simulated probe
- `procs/<pid>.json`: one registration per live (or recently dead) stand-in, with its load
  (requests in flight, a `/sim/busy` period) that the probe reports as its SM utilisation,
  and its CUDA checkpoint state (gpu_manager/checkpoint/simulated.py): `cuda_state` and, while
  checkpointed, `host_mb` (the MB parked in host memory; `mb` is then 0)
- `foreign.json`: {"<device>": MB}: usage injected to model a desktop or an unmanaged job
- `oom.jsonl`: one line per allocation the simulated GPU refused
- `lock`: the flock that serialises all of the above
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

DEFAULT_RELEASE_DELAY_MS = 500
# A registration's CUDA checkpoint states: the driver's CUprocessState names, lower-case.
RUNNING, LOCKED, CHECKPOINTED = "running", "locked", "checkpointed"
BLOCKED_POLL_S = 0.02


class SimulatedOOM(Exception):
    """The simulated GPU does not have the memory a workload asked for."""


class CudaStateError(Exception):
    """A checkpoint step asked of a process in the wrong state (CUDA_ERROR_ILLEGAL_STATE)."""


@dataclass(frozen=True, slots=True)
class Registration:
    pid: int
    create_time: float
    mb: int
    name: str
    device: int = 0
    dead_since: float | None = None  # wall-clock time the death was first seen
    registered_at: float | None = None  # wall-clock time the memory was claimed
    resized_at: float | None = None  # wall-clock time of the last sleep/wake resize
    # A process on several cards (tensor parallel): `mb` on each of these too.
    also: tuple[int, ...] = ()
    # Load, read by the probe as per-process SM utilisation. Defaults keep files written
    # before these fields existed loadable.
    in_flight: int = 0  # inference requests being answered now
    in_flight_pct: int = 0  # utilisation while any is
    busy_until: float | None = None  # wall-clock end of a `/sim/busy` period
    busy_pct: int = 0  # utilisation during it
    # Checkpoint state: kept in the file so that a restarted daemon still knows a process
    # it took off the GPU, and the MB to give back to it.
    cuda_state: str = RUNNING
    host_mb: int = 0  # while checkpointed: the MB parked in host memory

    @property
    def devices(self) -> tuple[int, ...]:
        return (self.device, *self.also)

    def util_pct(self, now: float) -> int:
        """SM utilisation at wall time `now`: the higher of the two loads; 0 once dead (a
        dead process computes nothing, though its memory is not released yet)."""
        if self.dead_since is not None:
            return 0
        serving = self.in_flight_pct if self.in_flight > 0 else 0
        held = self.busy_pct if self.busy_until is not None and now < self.busy_until else 0
        return max(serving, held)


SIM_UUID_PREFIX = "GPU-simulated-"


def sim_uuid(index: int) -> str:
    """A simulated card's UUID: what the daemon puts in CUDA_VISIBLE_DEVICES."""
    return f"{SIM_UUID_PREFIX}{index}"


EXIT_OOM = 3  # how a workload that found no room on the simulated GPU exits (as CUDA's OOM)


def placement(device: int | None) -> tuple[int, tuple[int, ...]]:
    """(card, other cards) to hold memory on: `device`, else what CUDA_VISIBLE_DEVICES
    names (the daemon hands a placed service its cards there), else card 0."""
    if device is not None:
        return device, ()
    visible = visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
    return (visible[0], visible[1:]) if visible else (0, ())


def hold(registry: SimRegistry, mb: int, name: str, device: int | None) -> int | None:
    """Register `mb` for this process on its card(s); EXIT_OOM (said on stderr) when the
    simulated GPU has no room, else None."""
    card, also = placement(device)
    try:
        registry.register(os.getpid(), mb, name, card, also)
    except SimulatedOOM as exc:
        print(exc, file=sys.stderr, flush=True)
        return EXIT_OOM
    return None


def visible_devices(value: str | None) -> tuple[int, ...]:
    """The simulated cards a CUDA_VISIBLE_DEVICES value names by our UUIDs (what the daemon
    hands a service it placed); () when it names none. Plain indices are ignored: a value
    the daemon did not set (a user's `CUDA_VISIBLE_DEVICES=1` in its own environment) must
    not move a one-GPU stand-in off the simulated card."""
    out: list[int] = []
    for raw in (value or "").split(","):
        item = raw.strip()
        if item.startswith(SIM_UUID_PREFIX) and item[len(SIM_UUID_PREFIX):].isdigit():
            out.append(int(item[len(SIM_UUID_PREFIX):]))
    return tuple(out)


def process_alive(pid: int, create_time: float) -> bool:
    """True while `pid` is the very process that registered (not a reused pid, not a zombie)."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return False


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class SimRegistry:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs = root / "procs"

    def ensure(self) -> None:
        self.procs.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.ensure()
        with open(self.root / "lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # -- the GPU's declared shape -------------------------------------------------------------
    def write_gpu(self, total_mb: int, release_delay_ms: int, device: int,
                  devices: dict[int, int] | None = None) -> None:
        cards = devices or {device: total_mb}
        with self._locked():
            _write_atomic(self.root / "gpu.json", {
                "total_mb": total_mb, "release_delay_ms": release_delay_ms, "device": device,
                "devices": {str(k): v for k, v in cards.items()},
            })

    def totals(self) -> dict[int, int]:
        """Each simulated card's total MB ({} before the probe declared any)."""
        gpu = self.gpu()
        if gpu is None:
            return {}
        cards = gpu.get("devices")
        if isinstance(cards, dict):
            return {int(k): int(v) for k, v in cards.items()}
        return {int(gpu.get("device", 0)): int(gpu["total_mb"])}

    def gpu(self) -> dict[str, int] | None:
        try:
            data = json.loads((self.root / "gpu.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def release_delay_s(self) -> float:
        gpu = self.gpu()
        ms = gpu.get("release_delay_ms", DEFAULT_RELEASE_DELAY_MS) if gpu else None
        return (ms if ms is not None else DEFAULT_RELEASE_DELAY_MS) / 1000

    # -- registrations ------------------------------------------------------------------------
    def active(self, release_delay_s: float | None = None) -> list[Registration]:
        """Registrations that still hold memory; expired ones are removed."""
        delay = self.release_delay_s() if release_delay_s is None else release_delay_s
        with self._locked():
            return self._active_locked(delay, time.time())

    def _active_locked(self, delay: float, now: float) -> list[Registration]:
        result: list[Registration] = []
        for path in self.procs.glob("*.json"):
            try:
                reg = Registration(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                path.unlink(missing_ok=True)  # a torn or foreign file holds no memory
                continue
            if reg.dead_since is None and not process_alive(reg.pid, reg.create_time):
                reg = dataclasses.replace(reg, dead_since=now)
                _write_atomic(path, asdict(reg))
            if reg.dead_since is not None and now - reg.dead_since >= delay:
                path.unlink(missing_ok=True)
                continue
            result.append(reg)
        return sorted(result, key=lambda r: r.pid)

    def register(self, pid: int, mb: int, name: str, device: int = 0,
                 also: tuple[int, ...] = ()) -> Registration:
        """Claim `mb` on `device` (and on each of `also`) for `pid`; raises SimulatedOOM
        when it does not fit."""
        create_time = psutil.Process(pid).create_time()
        reg = Registration(pid, create_time, mb, name, device, registered_at=time.time(),
                           also=tuple(also))
        with self._locked():
            self._check_fits_locked(reg)
            _write_atomic(self.procs / f"{pid}.json", asdict(reg))
        return reg

    def resize(self, pid: int, mb: int) -> Registration:
        """Change live `pid`'s MB: a decrease counts at once, an increase must fit (see above).
        Waits while `pid` is locked or checkpointed, as the driver blocks its CUDA calls.

        Raises SimulatedOOM when an increase does not fit (the registration is left as it
        was), LookupError when `pid` holds no registration.
        """
        while True:
            with self._locked():
                old = self._read_locked(pid)
                if old.cuda_state == RUNNING:
                    new = dataclasses.replace(old, mb=mb, resized_at=time.time())
                    if mb > old.mb:
                        self._check_fits_locked(new, resize_from_mb=old.mb)
                    _write_atomic(self.procs / f"{pid}.json", asdict(new))
                    return new
            time.sleep(BLOCKED_POLL_S)  # outside the flock: the unlock needs it

    def get(self, pid: int) -> Registration:
        """`pid`'s registration; LookupError when it has none."""
        with self._locked():
            return self._read_locked(pid)

    def cuda_step(self, pid: int, expect: str, to: str) -> Registration:
        """Move live `pid` from checkpoint state `expect` to `to`, as the driver's calls do:
        locked -> checkpointed parks its MB in host memory (`host_mb`, `mb` 0), checkpointed
        -> locked takes them back, on every card it holds, and must fit like an allocation.

        Raises CudaStateError when `pid` is not `expect`, SimulatedOOM when the MB do not fit
        back (left checkpointed), LookupError when `pid` holds no registration or has died.
        """
        with self._locked():
            old = self._read_locked(pid)
            if old.dead_since is not None or not process_alive(old.pid, old.create_time):
                raise LookupError(f"pid {pid} is not running")
            if old.cuda_state != expect:
                raise CudaStateError(f"pid {pid} is {old.cuda_state}, not {expect}")
            new = dataclasses.replace(old, cuda_state=to)
            if (expect, to) == (LOCKED, CHECKPOINTED):
                new = dataclasses.replace(new, mb=0, host_mb=old.mb, resized_at=time.time())
            elif (expect, to) == (CHECKPOINTED, LOCKED):
                new = dataclasses.replace(new, mb=old.host_mb, host_mb=0, resized_at=time.time())
                self._check_fits_locked(new, restore_from_host=True)
            _write_atomic(self.procs / f"{pid}.json", asdict(new))
        return new

    def set_in_flight(self, pid: int, count: int, util_pct: int) -> Registration:
        """Record that `pid` answers `count` inference requests now, at `util_pct` while
        any is; raises LookupError when `pid` holds no registration."""
        return self._update(pid, in_flight=max(count, 0), in_flight_pct=util_pct)

    def set_busy(self, pid: int, until: float, util_pct: int) -> Registration:
        """Make `pid` busy at `util_pct` until wall time `until` (replacing an earlier
        period); raises LookupError when `pid` holds no registration."""
        return self._update(pid, busy_until=until, busy_pct=util_pct)

    def _update(self, pid: int, **changes: Any) -> Registration:
        with self._locked():
            new = dataclasses.replace(self._read_locked(pid), **changes)
            _write_atomic(self.procs / f"{pid}.json", asdict(new))
        return new

    def _read_locked(self, pid: int) -> Registration:
        try:
            return Registration(**json.loads((self.procs / f"{pid}.json").read_text()))
        except (OSError, ValueError, TypeError):
            raise LookupError(f"pid {pid} has no registration") from None

    def _check_fits_locked(self, reg: Registration, **oom_extra: Any) -> None:
        """Raise SimulatedOOM (and log it) when `reg.mb` does not fit beside everyone else."""
        gpu, totals = self.gpu(), self.totals()
        if gpu is None:
            return  # no declared GPU: nothing to refuse against
        delay = gpu.get("release_delay_ms", DEFAULT_RELEASE_DELAY_MS) / 1000
        held = self._active_locked(delay, time.time())
        for device in reg.devices:
            if device not in totals:
                continue  # no declared GPU for this device
            used = sum(r.mb for r in held if device in r.devices and r.pid != reg.pid)
            used += self._foreign_locked().get(device, 0)
            free = totals[device] - used
            if reg.mb > free:
                self._oom_locked(reg, free, **oom_extra)
                raise SimulatedOOM(
                    f"CUDA out of memory (simulated): {reg.name} (pid {reg.pid}) tried to "
                    f"allocate {reg.mb} MB on device {device}, {max(free, 0)} MB free of "
                    f"{totals[device]} MB")

    def _oom_locked(self, reg: Registration, free: int, **extra: Any) -> None:
        with open(self.root / "oom.jsonl", "a") as fh:
            line = {**asdict(reg), **extra, "free_mb": free, "time": time.time()}
            fh.write(json.dumps(line) + "\n")

    def oom_events(self) -> list[dict[str, Any]]:
        try:
            lines = (self.root / "oom.jsonl").read_text().splitlines()
        except OSError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    # -- foreign usage ------------------------------------------------------------------------
    def _foreign_locked(self) -> dict[int, int]:
        try:
            data = json.loads((self.root / "foreign.json").read_text())
            return {int(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def foreign(self) -> dict[int, int]:
        with self._locked():
            return self._foreign_locked()

    def set_foreign(self, mb: int, device: int = 0) -> None:
        if mb < 0:
            raise ValueError("foreign usage cannot be negative")
        with self._locked():
            data = self._foreign_locked()
            data[device] = mb
            _write_atomic(self.root / "foreign.json", {str(k): v for k, v in data.items() if v})
