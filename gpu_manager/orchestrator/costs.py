"""What each release and return costs, learned: the measured durations of each service's cold
starts, wakes, sleeps, stops and reclaim waits (the last 20 of each, their median), kept
across restarts in `<state dir>/costs.json`.

The planner takes them as an input (it stays pure): among victims of equal priority it
preempts the set cheapest to bring back (a sleeper's wake, else its cold start). Written only
by the plan runs (`PlanRun._step`); the file is written off the event loop, one write at a
time, and a damaged file is set aside, never trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

from loguru import logger

KINDS = ("start", "wake", "sleep", "stop", "reclaim", "checkpoint", "restore")
KEEP = 20


class Costs:
    def __init__(self, path: Path | None, keep: int = KEEP) -> None:
        self.path = path
        self.keep = keep
        self._samples: dict[str, dict[str, deque[float]]] = {}
        self._saving: asyncio.Task[None] | None = None
        self._dirty = False
        self._load()

    def record(self, name: str, kind: str, seconds: float) -> None:
        if kind not in KINDS or not seconds >= 0:
            return
        per = self._samples.setdefault(name, {})
        per.setdefault(kind, deque(maxlen=self.keep)).append(round(seconds, 4))
        self._schedule_save()

    def p50(self, name: str, kind: str) -> float | None:
        got = self._samples.get(name, {}).get(kind)
        return statistics.median(got) if got else None

    def back_in(self, name: str, asleep: bool) -> float | None:
        """What bringing `name` back is expected to take: its wake if it will be asleep,
        else its cold start (None: never measured)."""
        return (self.p50(name, "wake") or self.p50(name, "restore") if asleep else None) \
            or self.p50(name, "start")

    def of(self, name: str) -> dict[str, Any]:
        return {kind: {"p50_s": round(statistics.median(v), 3), "n": len(v)}
                for kind, v in sorted(self._samples.get(name, {}).items()) if v}

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: self.of(name) for name in sorted(self._samples)}

    # -- persistence ---------------------------------------------------------------------------
    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            for name, kinds in data.items():
                for kind, values in kinds.items():
                    if kind in KINDS and isinstance(values, list):
                        self._samples.setdefault(str(name), {})[kind] = deque(
                            (float(v) for v in values if isinstance(v, int | float) and v >= 0),
                            maxlen=self.keep)
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            logger.warning(f"costs: {self.path} is unreadable ({exc}); set aside as {aside}, "
                           "learning again")
            self._samples.clear()
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)

    def _schedule_save(self) -> None:
        """One write in flight at a time; what is recorded meanwhile is written after it
        (no timer: nothing of it outlives the loop but a write under way)."""
        self._dirty = True
        if self.path is None or (self._saving is not None and not self._saving.done()):
            return
        try:
            self._saving = asyncio.get_running_loop().create_task(self._save_loop(),
                                                                  name="costs-save")
        except RuntimeError:  # no loop (a planner test): nothing to persist
            self._saving = None

    async def _save_loop(self) -> None:
        while self._dirty:
            self._dirty = False
            await self.flush()

    async def flush(self) -> None:
        """Write the file now (bounded; a failure is logged: the figures are only lost)."""
        if self.path is None:
            return
        data = {n: {k: list(v) for k, v in kinds.items()} for n, kinds in self._samples.items()}
        path = self.path

        def write() -> None:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)

        try:
            async with asyncio.timeout(5.0):
                await asyncio.to_thread(write)
        except Exception as exc:
            logger.opt(exception=exc).error(f"costs: could not write {path}: {exc}")
