"""The real driver: cuCheckpointProcess* in libcuda.so.1, through ctypes.

Signatures and layouts from cuda.h of CUDA 12.8 (driver API reference, "CUDA Checkpointing"):

    CUresult cuInit(unsigned int Flags);
    CUresult cuDriverGetVersion(int *driverVersion);
    CUresult cuGetErrorName(CUresult error, const char **pStr);
    CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state);
    CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args);
    CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args);
    CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args);
    CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args);

    typedef struct CUcheckpointLockArgs_st {
        unsigned int timeoutMs;   /* 0: no timeout */
        unsigned int reserved0;   /* must be zero */
        cuuint64_t reserved1[7];  /* must be zeroed */
    } CUcheckpointLockArgs;

CUresult and CUprocessState are C enums, int-sized. The Checkpoint, Restore and Unlock args hold
only reserved fields here (Restore's later gained GPU remapping) and are optional: we pass NULL.
The calls appeared in the headers of CUDA 12.8, the API that driver r570 implements, so a
driver below 12.8 is refused even if its library happens to export them.

`GPU_MANAGER_LIBCUDA` names another library to load (the tests' stub, a driver in a custom
place); the default is the driver's `libcuda.so.1`, found by the dynamic loader.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

from gpu_manager.checkpoint.base import (
    CUDA_ERROR_NOT_SUPPORTED,
    CUDA_SUCCESS,
    Capability,
    error_name,
)
from gpu_manager.checkpoint.sequence import DriverCheckpointer

LIBCUDA_ENV = "GPU_MANAGER_LIBCUDA"
DEFAULT_LIBRARY = "libcuda.so.1"
MIN_VERSION = 12080  # CUDA 12.8, driver r570: cuDriverGetVersion's 1000 * major + 10 * minor
NEEDS = "cuCheckpointProcess* needs driver 570 (CUDA 12.8) or newer"
CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessGetState", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock",
)
# The kernel module's version ("570.86.15"): what people call the driver's version, which
# libcuda itself does not report (cuDriverGetVersion gives the CUDA API version).
MODULE_VERSION = Path("/sys/module/nvidia/version")


class LockArgs(ctypes.Structure):
    """CUcheckpointLockArgs: 64 bytes; the reserved fields stay zero as ctypes creates them."""

    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint),
                ("reserved1", ctypes.c_uint64 * 7)]


_PID_ARGS = [ctypes.c_int, ctypes.c_void_p]  # (int pid, <args struct> *) passed as NULL
_ARGTYPES: dict[str, list[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuDriverGetVersion": [ctypes.POINTER(ctypes.c_int)],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuCheckpointProcessGetState": [ctypes.c_int, ctypes.POINTER(ctypes.c_int)],
    "cuCheckpointProcessLock": [ctypes.c_int, ctypes.POINTER(LockArgs)],
    "cuCheckpointProcessCheckpoint": _PID_ARGS,
    "cuCheckpointProcessRestore": _PID_ARGS,
    "cuCheckpointProcessUnlock": _PID_ARGS,
}


class LibCuda:
    """The loaded library; each function is resolved on its first use (an older driver
    lacks some, and that must be a reason, not a crash)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self._fns: dict[str, Any] = {}

    def fn(self, name: str) -> Any:
        """The function `name`, or None when the library does not export it."""
        if name not in self._fns:
            try:
                f = getattr(self.lib, name)
            except AttributeError:
                f = None
            else:
                f.argtypes, f.restype = _ARGTYPES[name], ctypes.c_int
            self._fns[name] = f
        return self._fns[name]

    def _call(self, name: str, *args: Any) -> int:
        f = self.fn(name)
        # Only reached once the capability check found every symbol; kept safe regardless.
        return CUDA_ERROR_NOT_SUPPORTED if f is None else int(f(*args))

    def get_state(self, pid: int) -> tuple[int, int]:
        state = ctypes.c_int(-1)
        code = self._call("cuCheckpointProcessGetState", pid, ctypes.byref(state))
        return code, state.value

    def lock(self, pid: int, timeout_ms: int) -> int:
        args = LockArgs(timeoutMs=max(0, timeout_ms))
        return self._call("cuCheckpointProcessLock", pid, ctypes.byref(args))

    def checkpoint(self, pid: int) -> int:
        return self._call("cuCheckpointProcessCheckpoint", pid, None)

    def restore(self, pid: int) -> int:
        return self._call("cuCheckpointProcessRestore", pid, None)

    def unlock(self, pid: int) -> int:
        return self._call("cuCheckpointProcessUnlock", pid, None)

    def error_name(self, code: int) -> str:
        """The driver's own name for `code` when it has one (it knows codes newer than
        this file), else ours."""
        f = self.fn("cuGetErrorName")
        if f is not None:
            name = ctypes.c_char_p()
            if f(code, ctypes.byref(name)) == CUDA_SUCCESS and name.value:
                return name.value.decode(errors="replace")
        return error_name(code)


def _module_version() -> str | None:
    try:
        return MODULE_VERSION.read_text().strip() or None
    except OSError:
        return None


def open_libcuda(path: str) -> tuple[LibCuda | None, Capability]:
    """Load `path` and judge it (blocking: cuInit can take a while). The library is returned
    only when capable."""
    try:
        cuda = LibCuda(ctypes.CDLL(path))
    except OSError as exc:
        return None, Capability(False, None, None, False, f"{path} not found: {exc}")
    missing = [s for s in CHECKPOINT_SYMBOLS if cuda.fn(s) is None]
    present = not missing
    get_version, init = cuda.fn("cuDriverGetVersion"), cuda.fn("cuInit")
    if get_version is None or init is None:
        return None, Capability(False, None, None, present,
                                f"{path} has no cuDriverGetVersion/cuInit: not a CUDA driver")
    raw = ctypes.c_int(0)
    code = get_version(ctypes.byref(raw))
    if code != CUDA_SUCCESS:
        return None, Capability(False, None, None, present,
                                f"cuDriverGetVersion failed: {cuda.error_name(code)} ({code})")
    version = raw.value
    label = f"{version // 1000}.{version % 1000 // 10}"
    module = _module_version()
    driver = f"{module} (CUDA {label})" if module else f"CUDA {label}"

    def refused(reason: str) -> tuple[None, Capability]:
        return None, Capability(False, driver, version, present, reason)

    if version < MIN_VERSION:
        return refused(f"driver {driver} < 570 (CUDA 12.8): {NEEDS}")
    if missing:
        return refused(f"{path} has no {', '.join(missing)}: {NEEDS}")
    # Restore needs cuInit to have run in the calling process (or persistence mode on).
    code = init(0)
    if code != CUDA_SUCCESS:
        return refused(f"cuInit failed: {cuda.error_name(code)} ({code})")
    return cuda, Capability(True, driver, version, True)


class LibcudaCheckpointer(DriverCheckpointer):
    """Checkpoints real CUDA processes with the driver's cuCheckpointProcess* calls."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(self._load)
        self.path = path or os.environ.get(LIBCUDA_ENV) or DEFAULT_LIBRARY

    def _load(self) -> tuple[LibCuda | None, Capability]:
        return open_libcuda(self.path)
