"""The poller: the only caller of the probe. Readers get the latest snapshot, never wait on NVML.

Probe calls run on one dedicated thread (NVML takes driver locks and some calls cost
milliseconds; one 90 ms call on the event loop would put 90 ms on every request's p99). The
loop polls slowly when idle (memory every `interval_s`, processes every `process_interval_s`)
and every `fast_interval_s`, processes included, while anyone holds `fast()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from loguru import logger

from gpu_manager.aio import wait_event
from gpu_manager.probe.model import GpuProbe, Snapshot


class Poller:
    def __init__(
        self, probe: GpuProbe, *, interval_s: float = 1.0, process_interval_s: float = 2.0,
        fast_interval_s: float = 0.1, reserve_mb: int = 0, device: int = 0,
        sample_timeout_s: float = 5.0,
    ) -> None:
        self.probe = probe
        self.sample_timeout_s = sample_timeout_s
        # A sample still running on the probe thread (hung in the driver): waited on again
        # instead of queueing another behind it.
        self._inflight: asyncio.Future[Snapshot] | None = None
        self.interval_s = interval_s
        self.process_interval_s = process_interval_s
        self.fast_interval_s = fast_interval_s
        self.reserve_mb = reserve_mb
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-probe")
        self._latest: Snapshot | None = None
        self._published = asyncio.Event()
        self._wake = asyncio.Event()
        self._fast_holders = 0
        self._last_processes = 0.0
        self._task: asyncio.Task[None] | None = None
        self.polls = 0
        self.errors = 0
        self.last_poll_s = 0.0

    # -- readers ------------------------------------------------------------------------------
    @property
    def latest(self) -> Snapshot:
        if self._latest is None:
            raise RuntimeError("the poller has not sampled yet; await start() first")
        return self._latest

    @property
    def fast_mode(self) -> bool:
        return self._fast_holders > 0

    def can_fit(self, required_mb: int, device: int | None = None) -> bool | None:
        """Whether `required_mb` fits in free memory minus the reserve; None when unknown."""
        dev = self.latest.device(self.device if device is None else device)
        if dev is None or dev.free_mb is None:
            return None
        return dev.free_mb - self.reserve_mb >= required_mb

    async def wait_until(
        self, predicate: Callable[[Snapshot], bool], timeout: float
    ) -> Snapshot | None:
        """Wait for a snapshot that satisfies `predicate`; None at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            event = self._published
            snap = self.latest
            if predicate(snap):
                return snap
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await wait_event(event, left)

    async def next_snapshot(self, timeout: float) -> Snapshot | None:
        """The first snapshot taken after this call; forces an early poll."""
        after = self.latest.taken_at
        self._wake.set()
        return await self.wait_until(lambda s: s.taken_at > after, timeout)

    @contextlib.asynccontextmanager
    async def fast(self) -> AsyncIterator[None]:
        """Poll fast (processes included) while inside; re-entrant across tasks."""
        self._fast_holders += 1
        self._wake.set()
        try:
            yield
        finally:
            self._fast_holders -= 1

    # -- the loop -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._poll(processes=True)
        self._task = asyncio.create_task(self._run(), name="gpu-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.get_running_loop().run_in_executor(self._executor, self.probe.close)
        self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        while True:
            interval = self.fast_interval_s if self.fast_mode else self.interval_s
            self._wake.clear()
            await wait_event(self._wake, interval)
            due = time.monotonic() - self._last_processes >= self.process_interval_s
            try:
                await self._poll(processes=self.fast_mode or due)
            except Exception as exc:  # the poller outlives its own bugs: stale data shows
                self.errors += 1
                logger.opt(exception=exc).error("GPU poller iteration failed: {}", exc)
                await asyncio.sleep(interval)

    async def _poll(self, processes: bool) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            if self._inflight is None or self._inflight.done():
                self._inflight = loop.run_in_executor(self._executor, self.probe.sample,
                                                      processes)
            try:
                async with asyncio.timeout(self.sample_timeout_s):
                    snap = await asyncio.shield(self._inflight)
            except TimeoutError as exc:
                # The thread cannot be interrupted; the next poll waits on the same sample.
                raise TimeoutError(f"no answer from the driver within "
                                   f"{self.sample_timeout_s:g}s") from exc
        except Exception as exc:  # a probe must not kill the poller
            self.errors += 1
            logger.opt(exception=exc).error("GPU probe failed: {}", exc)
            # The data is as old as the last good sample: keep its timestamps, so no reader
            # takes it for evidence newer than it is (reclaim counts only snapshots taken
            # after the last stop); only the error is new. With no good sample yet there
            # are no devices, which readers already treat as unknown.
            prev = self._latest
            snap = (dataclasses.replace(prev, error=f"probe failed: {exc}") if prev is not None
                    else Snapshot(self.probe.source, time.monotonic(), time.time(), (),
                                  error=f"probe failed: {exc}"))
        self.last_poll_s = time.perf_counter() - t0
        self.polls += 1
        if processes:
            self._last_processes = time.monotonic()
        snap = self._carry_processes(snap)
        self._latest = snap
        # Wake every waiter, then give the next ones a fresh event.
        published, self._published = self._published, asyncio.Event()
        published.set()

    def _carry_processes(self, snap: Snapshot) -> Snapshot:
        """A memory-only poll keeps the previous process list (with its own timestamp)."""
        prev = self._latest
        if prev is None or all(d.processes is not None or d.lost for d in snap.devices):
            return snap
        devices = []
        for dev in snap.devices:
            old = prev.device(dev.index)
            if dev.processes is None and not dev.lost and old is not None and old.processes_at:
                devices.append(dataclasses.replace(
                    dev, processes=old.processes, processes_at=old.processes_at))
            else:
                devices.append(dev)
        return dataclasses.replace(snap, devices=tuple(devices))
