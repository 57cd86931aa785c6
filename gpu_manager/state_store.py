"""What must survive a `kill -9` of the daemon, written atomically to the state dir.

Holds the identity of every unit the daemon started (pid + create time, or container id),
the current phase and the operations in flight. Written on every change with write-to-temp,
fsync and rename, so a crash at any moment leaves either the old or the new file, whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loguru import logger


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.units: dict[str, dict[str, Any]] = {}
        self.phase: int | None = None
        self.operations: dict[str, dict[str, Any]] = {}

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

    def set_unit(self, name: str, record: dict[str, Any] | None) -> None:
        if record is None:
            if self.units.pop(name, None) is None:
                return
        else:
            if self.units.get(name) == record:
                return
            self.units[name] = record
        self.save()

    def set_phase(self, phase: int | None) -> None:
        if phase != self.phase:
            self.phase = phase
            self.save()

    def set_operation(self, op_id: str, data: dict[str, Any] | None) -> None:
        if data is None:
            self.operations.pop(op_id, None)
        else:
            self.operations[op_id] = data
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        data = {"units": self.units, "phase": self.phase, "operations": self.operations}
        with open(tmp, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
