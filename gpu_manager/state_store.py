"""What must survive a `kill -9` of the daemon, written atomically to the state dir.

Holds the identity of every unit the daemon started (pid + create time, or container id),
the current phase and the operations in flight. Written after every change with
write-to-temp, fsync and rename (and an fsync of the directory), so a crash at any moment
leaves either the old or the new file, whole.

Changes are made in memory by the caller (cheap, synchronous, on the event loop); the disk
work is done by one writer thread. A burst of changes becomes one write of the latest state:
the writer snapshots the state when it wakes, so every change made before the snapshot is in
that write. A thread rather than an asyncio task because the store is also used with no
event loop running (load at start, tests), and a Condition works the same in both cases.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from loguru import logger

# After a failed write (disk full, permissions), wait this long before the next try, so a
# persistent error does not spin the writer; a new change also wakes it.
RETRY_AFTER_S = 1.0


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.units: dict[str, dict[str, Any]] = {}
        self.phase: int | None = None
        self.operations: dict[str, dict[str, Any]] = {}
        self.writes = 0  # files written: how well bursts coalesce (tests, metrics)
        self._cond = threading.Condition(threading.RLock())  # save() nests in set_*
        self._io = threading.Lock()  # one writer of the temp file at a time
        self._version = 0  # bumped on every change
        self._written = 0  # the version on disk
        self._failed = False  # the last write failed: retried on a timer
        self._closed = False
        self._thread: threading.Thread | None = None

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            logger.error(f"ignoring unreadable state file {self.path}: {exc}")
            return
        self.units = {k: v for k, v in data.get("units", {}).items() if isinstance(v, dict)}
        phase = data.get("phase")
        self.phase = phase if isinstance(phase, int) else None
        self.operations = dict(data.get("operations", {}))

    # Changes are made under the writer's lock: the writer serializes the dicts in its thread,
    # and a dict changed during that would raise or tear.
    def set_unit(self, name: str, record: dict[str, Any] | None) -> None:
        with self._cond:
            if record is None:
                if self.units.pop(name, None) is None:
                    return
            else:
                if self.units.get(name) == record:
                    return
                self.units[name] = record
            self.save()

    def set_phase(self, phase: int | None) -> None:
        with self._cond:
            if phase != self.phase:
                self.phase = phase
                self.save()

    def set_operation(self, op_id: str, data: dict[str, Any] | None) -> None:
        with self._cond:
            if data is None:
                self.operations.pop(op_id, None)
            else:
                self.operations[op_id] = data
            self.save()

    # -- the writer ---------------------------------------------------------------------------
    def save(self) -> None:
        """Schedule a write of the current state; returns at once."""
        with self._cond:
            self._version += 1
            if self._closed:
                # After close() no thread writes for us: write here, so a change made by a
                # straggler of the shutdown is still on disk (rare, and off the hot path).
                version, text = self._version, self._serialize()
                self._write_logged(version, text)
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="state-writer",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _serialize(self) -> str:
        # Under `_cond`: the event loop cannot change the dicts meanwhile. The same text
        # json.dump wrote before (the on-disk format is unchanged).
        return json.dumps({"units": self.units, "phase": self.phase,
                           "operations": self.operations})

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._written == self._version and not self._closed:
                    self._cond.wait()
                if self._written == self._version:
                    return  # closed, and nothing left to write
                if self._failed and not self._closed:
                    self._cond.wait(RETRY_AFTER_S)  # a new change wakes us sooner
                version, text = self._version, self._serialize()
            ok = self._write_logged(version, text)
            with self._cond:
                self._failed = not ok
                if not ok and self._closed:
                    self._written = self._version  # give up: close() is waiting on us
                self._cond.notify_all()

    def _write_logged(self, version: int, text: str) -> bool:
        """Write `text` as state `version`; a failure is logged (never raised)."""
        try:
            with self._io:
                self._write(text)
        except Exception as exc:  # never kill the writer: the next change retries
            logger.opt(exception=exc).error(f"cannot write the state file {self.path}: {exc}")
            return False
        with self._cond:
            self._written = max(self._written, version)
            self.writes += 1
        return True

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        # The rename itself must reach the disk, or a power cut could bring back the old file.
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def wait_written(self, timeout: float) -> bool:
        """Block until every change made so far is on disk; False at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._version
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return self._written >= target
                self._cond.wait(left)
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending and stop the writer (later changes are written inline)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.error(f"the state writer did not finish within {timeout:g}s")

    async def aclose(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.close, timeout)
