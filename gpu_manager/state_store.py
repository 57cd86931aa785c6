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


def unit_record_problem(record: object) -> str | None:
    """Why `record` cannot be a unit's record (None: it can). Only the shape is checked
    here; whether the process or container is still the unit's is for adoption to prove."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    kind = record.get("kind")
    if kind == "native":
        pid, created = record.get("pid"), record.get("create_time")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return f"pid {pid!r} is not a process id"
        if not isinstance(created, int | float) or isinstance(created, bool):
            return f"create_time {created!r} is not a time"
        if not isinstance(record.get("token"), str | None):
            return "token is not a string"
    elif kind == "docker":
        if not isinstance(record.get("id"), str) or not record["id"]:
            return "no container id"
    elif not isinstance(kind, str):
        return "no kind"
    value = record.get("devices")
    if value is not None and not (isinstance(value, list)
                                  and all(isinstance(d, int) for d in value)):
        return f"devices {value!r} is not a list of card indices"
    for key in ("visible", "memo"):
        value = record.get(key)
        if value is not None and not (isinstance(value, list)
                                      and all(isinstance(v, str) for v in value)):
            return f"{key} {value!r} is not a list of names"
    if not isinstance(record.get("intent"), str | None):
        return "intent is not a string"
    return None


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.units: dict[str, dict[str, Any]] = {}
        self.phase: int | None = None
        self.operations: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []  # what the last load dropped, and why
        self.writes = 0  # files written: how well bursts coalesce (tests, metrics)
        self._cond = threading.Condition(threading.RLock())  # save() nests in set_*
        self._io = threading.Lock()  # one writer of the temp file at a time
        self._version = 0  # bumped on every change
        self._written = 0  # the version on disk
        self._failed = False  # the last write failed: retried on a timer
        self._closed = False
        self._thread: threading.Thread | None = None

    def load(self) -> list[str]:
        """Load what is valid and report the rest: one line per part dropped, also kept in
        `problems`. A file that is not the state's shape (a list, `units` a list, a record
        of another shape) no longer stops the daemon, which would leave the services running
        unmanaged; what was dropped is copied beside it (`state.json.damaged-<time>`), so
        nothing is lost."""
        self.problems = []
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            return self._damaged(None, f"unreadable: {exc}")
        try:
            data = json.loads(text)
        except ValueError as exc:
            return self._damaged(text, f"not JSON: {exc}")
        if not isinstance(data, dict):
            return self._damaged(text, f"a JSON {type(data).__name__}, not an object")
        units = data.get("units", {})
        if not isinstance(units, dict):
            self.problems.append(f"units: a JSON {type(units).__name__}, not an object")
            units = {}
        for name, record in units.items():
            why = unit_record_problem(record)
            if why is None:
                self.units[str(name)] = record
            else:
                self.problems.append(f"units.{name}: {why}")
        phase = data.get("phase")
        if isinstance(phase, int) and not isinstance(phase, bool):
            self.phase = phase
        elif phase is not None:
            self.problems.append(f"phase: {phase!r} is not a phase number")
        operations = data.get("operations", {})
        if not isinstance(operations, dict):
            self.problems.append(f"operations: a JSON {type(operations).__name__}, "
                                 "not an object")
            operations = {}
        for op_id, op in operations.items():
            if isinstance(op, dict) and isinstance(op.get("request"), dict):
                self.operations[str(op_id)] = op
            else:
                self.problems.append(f"operations.{op_id}: not an operation record")
        if self.problems:
            self._keep_copy(text)
            for problem in self.problems:
                logger.error(f"state file {self.path}: dropped {problem}")
        return list(self.problems)

    def _damaged(self, text: str | None, why: str) -> list[str]:
        self.problems = [f"the whole file: {why}"]
        logger.error(f"ignoring the state file {self.path}: {why}")
        if text is not None:
            self._keep_copy(text)
        return list(self.problems)

    def _keep_copy(self, text: str) -> None:
        copy = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        try:
            copy.write_text(text)
            logger.error(f"the damaged state file is kept as {copy}")
        except OSError as exc:
            logger.error(f"cannot keep a copy of the damaged state file: {exc}")

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
