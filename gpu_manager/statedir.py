"""One daemon per state directory: an exclusive lock on `<state dir>/daemon.lock`.

The state directory holds what a daemon owns: the record of the services it started, the
simulated GPU's registry, the logs. A second daemon on the same directory (`gpu-manager
serve` run by hand while the systemd unit runs) used to adopt the first one's services from
the record, fail to bind the port, and stop them all on its way out. Now the lock is taken
before anything is read or adopted and held for the process's life; a second instance fails
at once, naming the directory and the holder's pid, and touches nothing.

`flock` rather than a pid file: the kernel drops it when the holder dies (kill -9 included),
so a stale lock never needs a human. The file's content (the holder's pid) is only for the
message. The descriptor is not inherited by the services the daemon launches (Python opens
files close-on-exec), so a service that outlives its daemon does not keep the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "daemon.lock"
# This process's locks: a daemon started in-process (tests) and `serve` share one.
_held: dict[Path, int] = {}


class StateDirBusy(Exception):
    def __init__(self, state_dir: Path, pid: int | None) -> None:
        self.state_dir = state_dir
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"the state directory {state_dir} is in use by another gpu-manager "
                         f"daemon ({who}); one daemon per state directory: stop it, or give "
                         "this one its own GPU_MANAGER_STATE_DIR")


def hold(state_dir: Path) -> None:
    """Take the state directory's lock for this process (again: no-op); raises StateDirBusy
    when another process holds it."""
    key = state_dir.resolve()
    if key in _held:
        return
    key.mkdir(parents=True, exist_ok=True)
    path = key / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise StateDirBusy(key, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def release(state_dir: Path) -> None:
    """Drop the lock (the daemon stopped; the process may go on, as in tests)."""
    fd = _held.pop(state_dir.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
