"""Size-based rollover of native services' logs while they run.

`rotate_log` (native.py) renames a log at each start; a service that runs for weeks would
still grow its log without bound. A child writes its log through an fd we opened with
O_APPEND, and it keeps that fd: renaming the file under it would leave it writing into the
backup. So a running log is rolled over by copy-then-truncate: copy it to `name.log.1`
(older backups shift to .2 ... .N, the oldest is dropped), then truncate it to zero. With
O_APPEND every write of the child goes to the current end, so after the truncate it writes at
offset 0 of the same file: no hole, no stale offset. Lines written between the copy and the
truncate are lost; the copy reads to end of file just before truncating, so that window is a
few microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from gpu_manager.aio import within

# A check that takes longer than this (a hung disk) is abandoned; the thread doing it cannot
# be cancelled and finishes on its own, the next check starts on time.
CHECK_TIMEOUT_S = 30.0


def native_logs(units: Mapping[str, Any]) -> list[Path]:
    """The log files of the native services among `units` (Unit objects, by name)."""
    paths: list[Path] = []
    for unit in units.values():
        path = getattr(unit.driver, "log_path", None)
        if isinstance(path, Path):
            paths.append(path)
    return paths


def copy_truncate(path: Path, backups: int) -> None:
    """Roll `path` over to `path.1` while a writer keeps it open with O_APPEND."""
    for i in range(backups - 1, 0, -1):
        src = path.with_name(f"{path.name}.{i}")
        if src.exists():
            os.replace(src, path.with_name(f"{path.name}.{i + 1}"))
    dest = path.with_name(f"{path.name}.1")
    with open(path, "r+b") as src_fh, open(dest, "wb") as dst_fh:
        shutil.copyfileobj(src_fh, dst_fh)
        # Whatever the child wrote while we copied is read too: copyfileobj reads to EOF.
        src_fh.truncate(0)


class LogRotator:
    """Checks every `every_s` seconds; rolls a log over past `max_bytes`, keeping `backups`."""

    def __init__(self, paths: Callable[[], Iterable[Path]], max_bytes: int, backups: int,
                 every_s: float = 5.0) -> None:
        self.paths = paths
        self.max_bytes = max_bytes
        self.backups = backups
        self.every_s = every_s
        self.rotations = 0  # logs rolled over so far
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run on its own task (tests); the daemon runs `run` under its supervisor."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="child-log-rotation")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            # bounded: at worst the check's thread runs on, ours does not wait for it
            await within(task, 5)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                paths = list(self.paths())
                await within(asyncio.to_thread(self.check, paths), CHECK_TIMEOUT_S)
            except Exception as exc:  # a bad disk or a vanished dir must not end rotation
                logger.opt(exception=exc).error(f"child log rotation failed: {exc}")

    def check(self, paths: Iterable[Path]) -> int:
        """Roll over every log past the size limit (blocking); how many were."""
        rolled = 0
        for path in paths:
            try:
                if path.stat().st_size < self.max_bytes:
                    continue
            except FileNotFoundError:
                continue
            try:
                copy_truncate(path, self.backups)
            except OSError as exc:  # this log only; the others still get their turn
                logger.opt(exception=exc).error(f"cannot roll over {path}: {exc}")
                continue
            rolled += 1
            self.rotations += 1
        return rolled
