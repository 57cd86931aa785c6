"""The NVML backend, through the official binding `nvidia-ml-py` (module `pynvml`).

All NVML calls go through `_call`, the single entry point (the nvitop habit): it maps
NOT_SUPPORTED and a missing function to UNKNOWN (logging a missing function once), turns
GPU_IS_LOST into a lost device, and lets every other error surface as the device's error.
Nothing here ever raises out of `sample`; a GPU that misbehaves is reported, not crashed on.

Per-process SM utilisation comes from nvmlDeviceGetProcessUtilization, read with the process
list (never on a memory-only poll): the samples since the newest one the last read saw, a
pid's figure the highest of its samples. No sample for a listed pid (NOT_FOUND: none at all)
means it did not run: 0. Where the driver cannot tell (NOT_SUPPORTED, vGPU, MIG, any other
error) the figure is unknown, None, and the rest of the device is still read.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import psutil
import pynvml
from loguru import logger

from gpu_manager.probe.model import (
    DeviceSnapshot,
    GpuProcess,
    ProbeUnavailable,
    Snapshot,
    Source,
)

MB = 1024 * 1024


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


class GpuLost(Exception):
    pass


class _ProcInfoV1(ctypes.Structure):
    # nvml.h: nvmlProcessInfo_v1_t, used by the unversioned *RunningProcesses functions of old
    # drivers. The binding has no wrapper for it, so we call that symbol ourselves.
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]


_NA_ULL = ctypes.c_ulonglong(-1).value


def _mb(value: Any) -> int | None:
    if value is None or value is UNKNOWN or value == _NA_ULL:
        return None
    return int(value) // MB


def _text(value: Any) -> str | None:
    if value is UNKNOWN or value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlProbe:
    source: Source = "nvml"

    def __init__(self) -> None:
        # Importing the binding loads nothing; the library is opened by nvmlInit in init().
        self._nv = pynvml
        self._lock = threading.Lock()
        self._initialized = False
        self._handles: list[Any] = []
        self._warned: set[str] = set()
        # Remembered per kind once a newer version turned out to be missing.
        self._proc_version: dict[str, int] = {"compute": 3, "graphics": 3}
        self._mem_v2 = True
        # Device index -> the newest process utilisation sample seen (NVML's microseconds):
        # each read asks for the samples after it, so a sample counts in one window only.
        self._util_seen: dict[int, int] = {}
        self.driver_version: str | None = None

    # -- the single entry point ---------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _call(
        self, fn_name: str, *args: Any, impl: Callable[..., Any] | None = None,
        raise_codes: tuple[int, ...] = (), **kwargs: Any,
    ) -> Any:
        """Call NVML function `fn_name` (or `impl` standing for it) and map its errors.

        Codes in `raise_codes` are re-raised for the caller's own fallback logic.
        """
        nv = self._nv
        fn: Callable[..., Any] | None = impl or getattr(nv, fn_name, None)
        if fn is None:
            self._warn_once(fn_name, f"NVML binding has no {fn_name}; reporting it as unknown")
            return UNKNOWN
        try:
            return fn(*args, **kwargs)
        except nv.NVMLError as exc:
            code = exc.value
            if code in raise_codes:
                raise
            if code == nv.NVML_ERROR_GPU_IS_LOST:
                raise GpuLost(f"{fn_name}: GPU is lost") from exc
            if code == nv.NVML_ERROR_NOT_SUPPORTED:
                return UNKNOWN
            if code == nv.NVML_ERROR_FUNCTION_NOT_FOUND:
                self._warn_once(fn_name, f"the NVML driver library lacks {fn_name}; "
                                "reporting it as unknown")
                return UNKNOWN
            raise

    # -- lifecycle ----------------------------------------------------------------------------
    def init(self) -> None:
        """Initialise NVML and enumerate devices; raises ProbeUnavailable with the reason."""
        with self._lock:
            if self._initialized:
                return
            nv = self._nv
            try:
                nv.nvmlInit()
                count = nv.nvmlDeviceGetCount()
                self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            except nv.NVMLError as exc:
                raise ProbeUnavailable(f"NVML unavailable: {exc} (code {exc.value})") from exc
            except OSError as exc:  # pragma: no cover - ctypes-level failure
                raise ProbeUnavailable(f"NVML unavailable: {exc}") from exc
            self.driver_version = _text(self._safe("nvmlSystemGetDriverVersion"))
            self._initialized = True
            logger.info(f"NVML initialised: {count} device(s), driver {self.driver_version}")

    def _safe(self, fn_name: str, *args: Any) -> Any:
        try:
            return self._call(fn_name, *args)
        except (GpuLost, self._nv.NVMLError):
            return UNKNOWN

    def close(self) -> None:
        with self._lock:
            if self._initialized:
                with contextlib.suppress(self._nv.NVMLError):
                    self._nv.nvmlShutdown()
                self._initialized = False

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, processes: bool = True) -> Snapshot:
        self.init()
        with self._lock:
            devices = tuple(self._device(i, h, processes) for i, h in enumerate(self._handles))
        now = time.monotonic()
        return Snapshot("nvml", now, time.time(), devices)

    def _device(self, index: int, handle: Any, processes: bool) -> DeviceSnapshot:
        try:
            total, used, free, reserved = self._memory(handle)
            temp = self._call("nvmlDeviceGetTemperature", handle, self._nv.NVML_TEMPERATURE_GPU)
            util = self._call("nvmlDeviceGetUtilizationRates", handle)
            procs = self._processes(index, handle) if processes else None
            return DeviceSnapshot(
                index=index,
                name=_text(self._call("nvmlDeviceGetName", handle)),
                uuid=_text(self._call("nvmlDeviceGetUUID", handle)),
                total_mb=total, used_mb=used, free_mb=free, reserved_mb=reserved,
                temperature_c=None if temp is UNKNOWN else int(temp),
                utilization_percent=None if util is UNKNOWN else int(util.gpu),
                processes=procs,
                processes_at=time.monotonic() if procs is not None else None,
            )
        except GpuLost as exc:
            self._warn_once(f"lost-{index}", f"GPU {index} is lost: {exc}")
            return DeviceSnapshot(index=index, lost=True, error="GPU is lost")
        except self._nv.NVMLError as exc:
            return DeviceSnapshot(index=index, error=f"NVML error {exc.value}: {exc}")

    def _memory(self, handle: Any) -> tuple[int | None, int | None, int | None, int | None]:
        nv = self._nv
        reserved: int | None = None
        info: Any = UNKNOWN
        if self._mem_v2:
            try:
                info = self._call(
                    "nvmlDeviceGetMemoryInfo_v2", handle, version=nv.nvmlMemory_v2,
                    impl=nv.nvmlDeviceGetMemoryInfo,
                    raise_codes=(nv.NVML_ERROR_FUNCTION_NOT_FOUND,
                                 nv.NVML_ERROR_ARGUMENT_VERSION_MISMATCH),
                )
            except nv.NVMLError:
                self._mem_v2 = False
                self._warn_once("mem_v2", "NVML memory info v2 unavailable; using v1")
            else:
                reserved = None if info is UNKNOWN else _mb(info.reserved)
        if not self._mem_v2:
            info = self._call("nvmlDeviceGetMemoryInfo", handle)
        if info is UNKNOWN:  # unified memory (integrated GPUs): no dedicated VRAM figures
            return None, None, None, None
        total, free = _mb(info.total), _mb(info.free)
        # total - free, so v1 and v2 agree (v1's `used` includes the reserved memory).
        used = total - free if total is not None and free is not None else None
        return total, used, free, reserved

    def _processes(self, index: int, handle: Any) -> tuple[GpuProcess, ...] | None:
        merged: dict[int, GpuProcess] = {}
        for kind in ("compute", "graphics"):
            entries = self._process_list(handle, kind)
            if entries is None:
                return None
            for pid, used in entries:
                prev = merged.get(pid)
                # A process can be listed as both compute and graphics with the same memory.
                if prev is None or (used or 0) > (prev.used_mb or 0):
                    merged[pid] = GpuProcess(pid, _proc_name(pid), used,
                                             kind if prev is None else prev.kind)
        utils = self._process_utils(index, handle)
        if utils is not None:
            merged = {pid: dataclasses.replace(p, util_pct=utils.get(pid, 0))
                      for pid, p in merged.items()}
        return tuple(sorted(merged.values(), key=lambda p: p.pid))

    def _process_utils(self, index: int, handle: Any) -> dict[int, int] | None:
        """pid -> its highest SM utilisation in the samples since the last read ({}: no
        process ran); None when the driver cannot say."""
        nv = self._nv
        since = self._util_seen.get(index, 0)
        try:
            samples = self._call("nvmlDeviceGetProcessUtilization", handle, since,
                                 raise_codes=(nv.NVML_ERROR_NOT_FOUND,))
        except nv.NVMLError as exc:  # GPU_IS_LOST is GpuLost by now: the device is lost
            if exc.value == nv.NVML_ERROR_NOT_FOUND:
                return {}  # no sample in the window: nothing ran
            self._warn_once(f"putil-{index}", f"per-process utilisation of GPU {index} "
                            f"unreadable (NVML error {exc.value}: {exc}); reporting unknown")
            return None
        if samples is UNKNOWN:  # NOT_SUPPORTED, or a binding/driver without the call
            return None
        utils: dict[int, int] = {}
        newest = since
        for sample in samples:
            pid = int(sample.pid)
            # clamped: a driver's "not available" sentinel must not read as a huge load
            utils[pid] = max(utils.get(pid, 0), min(int(sample.smUtil), 100))
            newest = max(newest, int(sample.timeStamp))
        self._util_seen[index] = newest
        return utils

    def _process_list(self, handle: Any, kind: str) -> list[tuple[int, int | None]] | None:
        """v3 -> v2 -> v1: remember the first version the driver has. None = unknown."""
        nv = self._nv
        base = "nvmlDevice" + ("GetComputeRunningProcesses" if kind == "compute"
                               else "GetGraphicsRunningProcesses")
        while True:
            version = self._proc_version[kind]
            name = f"{base}_v{version}" if version > 1 else base
            impl = getattr(nv, name) if version > 1 else (
                lambda h, b=base: self._process_list_v1(h, b))
            try:
                procs = self._call(name, handle, impl=impl,
                                   raise_codes=(nv.NVML_ERROR_FUNCTION_NOT_FOUND,))
            except nv.NVMLError:
                if version == 1:
                    self._warn_once(name, f"the NVML driver library lacks {name}")
                    return None
                self._proc_version[kind] = version - 1
                self._warn_once(name, f"{name} missing; falling back to v{version - 1}")
                continue
            if procs is UNKNOWN:  # NOT_SUPPORTED: per-process memory under WDDM/MIG
                return None
            if version == 1:
                return list(procs)
            return [(int(p.pid), _mb(p.usedGpuMemory)) for p in procs]

    def _process_list_v1(self, handle: Any, symbol: str) -> list[tuple[int, int | None]]:
        nv = self._nv
        fn = nv._nvmlGetFunctionPointer(symbol)
        count = ctypes.c_uint(0)
        ret = fn(handle, ctypes.byref(count), None)
        if ret == nv.NVML_SUCCESS:
            return []
        if ret != nv.NVML_ERROR_INSUFFICIENT_SIZE:
            raise nv.NVMLError(ret)
        count.value = count.value * 2 + 5  # room for processes started in between
        arr = (_ProcInfoV1 * count.value)()
        ret = fn(handle, ctypes.byref(count), arr)
        if ret != nv.NVML_SUCCESS:
            raise nv.NVMLError(ret)
        return [(int(arr[i].pid), _mb(arr[i].usedGpuMemory)) for i in range(count.value)]


def _proc_name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None
