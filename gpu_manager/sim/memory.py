"""The VRAM a sleep-capable stand-in holds, in named parts that sleep and wake releases and takes.

One code path for both kinds of memory: `ModelMemory` decides what is held, when, and how long
each change takes; a backend only makes the device hold exactly the parts it is given. The
simulated backend resizes the process's registration in the simulated GPU's registry; the CUDA
backend allocates one buffer per part and, on release, drops the buffers and empties the
allocator's cache (what a real server's sleep does), so the simulated tests exercise the same
logic that runs on a real GPU.

Parts: "residual" (`--sleep-vram-mb`, what stays held while asleep: CUDA context, buffers) plus
the model's parts: "weights" and "kv_cache" for vLLM/SGLang (which sleep and wake them by tag),
a single "model" for the others.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from gpu_manager.sim.registry import SimRegistry, SimulatedOOM

RESIDUAL = "residual"


class DeviceOOM(Exception):
    """The device refused an allocation; the message always contains "CUDA out of memory"."""


class Backend(Protocol):
    def apply(self, parts: Mapping[str, int]) -> None:
        """Hold exactly `parts` (name -> MB); raise DeviceOOM, holding what was held before."""

    def device_mb(self) -> tuple[int, int] | None:
        """(total, free) MB of the device, or None when unknown."""


class SimulatedBackend:
    """The simulated GPU: the registration's MB is the sum of the held parts."""

    def __init__(self, registry: SimRegistry, pid: int | None = None,
                 device: int | None = None) -> None:
        self.registry = registry
        self.pid = os.getpid() if pid is None else pid
        self.device = device  # None: the simulated GPU's primary card

    def apply(self, parts: Mapping[str, int]) -> None:
        try:
            self.registry.resize(self.pid, sum(parts.values()))
        except SimulatedOOM as exc:
            raise DeviceOOM(str(exc)) from exc

    def device_mb(self) -> tuple[int, int] | None:
        gpu = self.registry.gpu()
        if gpu is None:
            return None
        device = self.device if self.device is not None else int(gpu.get("device", 0))
        total = self.registry.totals().get(device)
        if total is None:
            return None
        used = sum(r.mb for r in self.registry.active() if device in r.devices)
        used += self.registry.foreign().get(device, 0)
        return total, max(total - used, 0)


def _cuda_module() -> tuple[str, Any]:
    # Optional heavy dependencies, looked up at run time: neither is a dependency of ours.
    for name in ("torch", "cupy"):
        try:
            return name, importlib.import_module(name)
        except ImportError:
            continue
    raise SystemExit("--cuda needs torch or cupy installed")


def allocate_cuda(mb: int, device: int) -> Any:
    """Hold `mb` MB of real device memory; returns the buffer (keep a reference)."""
    n = mb * 1024 * 1024
    name, mod = _cuda_module()
    if name == "torch":
        buf = mod.empty(n, dtype=mod.uint8, device=f"cuda:{device}")
        buf.fill_(1)  # touch it, so the driver really backs every page
        mod.cuda.synchronize(device)
        return buf
    with mod.cuda.Device(device):
        buf = mod.ones(n, dtype=mod.uint8)
        mod.cuda.Device(device).synchronize()
        return buf


class CudaBackend:
    """Real device memory: one buffer per held part."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.kind, self.mod = _cuda_module()
        self.buffers: dict[str, tuple[int, Any]] = {}

    def _empty_cache(self) -> None:
        # Dropping the last reference only returns blocks to the caching allocator; the driver
        # (and nvidia-smi, and the orchestrator) sees the memory free only once it is emptied.
        if self.kind == "torch":
            self.mod.cuda.empty_cache()
        else:
            with self.mod.cuda.Device(self.device):
                self.mod.get_default_memory_pool().free_all_blocks()

    def _is_oom(self, exc: BaseException) -> bool:
        if self.kind == "torch":
            return isinstance(exc, self.mod.cuda.OutOfMemoryError)
        return isinstance(exc, self.mod.cuda.memory.OutOfMemoryError)

    def apply(self, parts: Mapping[str, int]) -> None:
        gone = [k for k, (mb, _) in self.buffers.items() if parts.get(k) != mb]
        for k in gone:
            del self.buffers[k]
        if gone:
            self._empty_cache()
        added: list[str] = []
        try:
            for k, mb in parts.items():
                if k not in self.buffers and mb > 0:
                    self.buffers[k] = (mb, allocate_cuda(mb, self.device))
                    added.append(k)
        except Exception as exc:
            if not self._is_oom(exc):
                raise
            # Leave the device as it was asked to be before this call: nothing half-woken.
            for k in added:
                del self.buffers[k]
            self._empty_cache()
            msg = str(exc)
            raise DeviceOOM(msg if "CUDA out of memory" in msg
                            else f"CUDA out of memory: {msg}") from exc

    def device_mb(self) -> tuple[int, int] | None:
        if self.kind == "torch":
            free, total = self.mod.cuda.mem_get_info(self.device)
        else:
            with self.mod.cuda.Device(self.device):
                free, total = self.mod.cuda.runtime.memGetInfo()
        return int(total) // 2**20, int(free) // 2**20


class ModelMemory:
    """Sleep/wake state of a stand-in's VRAM; transitions are serialised and take real time.

    `sleep` takes `sleep_s` and then releases (so the memory is gone when it returns, as vLLM
    and SGLang answer); `wake` allocates first (a refusal fails at once, as CUDA does) and then
    takes `wake_s` (copying weights back), plus `reload_s` when the weights were discarded
    rather than kept in host RAM (vLLM level 2: they come from disk again).
    With `keeps_memory` (a fault for tests) the state changes but the device is never told.
    """

    def __init__(self, backend: Backend, parts: Mapping[str, int], residual_mb: int, *,
                 sleep_s: float = 0.0, wake_s: float = 0.0, reload_s: float = 0.0,
                 keeps_memory: bool = False) -> None:
        self.backend = backend
        self.parts = dict(parts)
        self.residual_mb = residual_mb
        self.sleep_s, self.wake_s, self.reload_s = sleep_s, wake_s, reload_s
        self.keeps_memory = keeps_memory
        self.released: set[str] = set()
        self.discarded: set[str] = set()  # released with no host copy: waking reloads them
        self._lock = threading.Lock()  # one transition at a time, as a real engine does

    @property
    def asleep(self) -> bool:
        return bool(self.released)

    def held(self, released: Collection[str] | None = None) -> dict[str, int]:
        """The parts held when `released` (default: the current set) are let go."""
        gone = self.released if released is None else released
        held = {k: mb for k, mb in self.parts.items() if k not in gone}
        return {RESIDUAL: self.residual_mb, **held}

    def held_mb(self) -> int:
        return sum(self.held().values())

    def _select(self, tags: Collection[str] | None) -> set[str]:
        if tags is None:
            return set(self.parts)
        unknown = set(tags) - set(self.parts)
        if unknown:
            raise ValueError(f"unknown memory tags {sorted(unknown)}; "
                             f"known: {sorted(self.parts)}")
        return set(tags)

    def sleep(self, tags: Collection[str] | None = None, discard: Collection[str] = ()) -> bool:
        """Release `tags` (default: all parts); False when they were already released.

        `discard`: the parts among them whose host copy is dropped too (vLLM level 2's weights):
        waking those takes `reload_s` on top of `wake_s`.
        """
        want = self._select(tags)
        with self._lock:
            todo = want - self.released
            if not todo:
                return False
            time.sleep(self.sleep_s)  # offloading/tearing down takes this long, then it's free
            if not self.keeps_memory:
                self.backend.apply(self.held(self.released | todo))
            self.released |= todo
            self.discarded |= todo & set(discard)
            return True

    def wake(self, tags: Collection[str] | None = None) -> bool:
        """Take `tags` (default: all parts) back; False when already held; raises DeviceOOM."""
        want = self._select(tags)
        with self._lock:
            todo = want & self.released
            if not todo:
                return False
            if not self.keeps_memory:
                self.backend.apply(self.held(self.released - todo))
            time.sleep(self.wake_s + (self.reload_s if todo & self.discarded else 0.0))
            self.released -= todo
            self.discarded -= todo
            return True
