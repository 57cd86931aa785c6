"""The daemon: wires config, probe, lock, units and orchestrator together, starts and stops them.

Start order: the state directory's lock (one daemon per state dir: taken before anything is
read or adopted) -> state store -> probe + poller -> lock -> units (re-adopting what the
previous daemon started, on each process's own proof) -> orchestrator -> background tasks.
Stopping the daemon leaves managed services running: the next daemon adopts them.

Every long-lived task runs under one `Supervisor` (a crash is logged, shown in /ready and the
task restarted), and `stop()` is bounded step by step: whatever one step does (hangs, raises),
the next still runs, so the GPU lock is always released and every client closed.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable
from typing import Any

from loguru import logger

from gpu_manager import statedir
from gpu_manager.aio import Supervisor, wait_event
from gpu_manager.bounds import DEFAULT, Bounds
from gpu_manager.config import (
    DockerService,
    Inventory,
    LeaseConfig,
    ServiceConfig,
    load_inventory,
)
from gpu_manager.hooks import Invalidates, NoCache, RequestDoor
from gpu_manager.lock import GpuLock, LockInfo, make_lock
from gpu_manager.orchestrator import Orchestrator
from gpu_manager.orchestrator.cards import foreign_on
from gpu_manager.orchestrator.leases import LeaseManager
from gpu_manager.orchestrator.operations import interrupted
from gpu_manager.paths import SIM_DIR_ENV, sim_dir
from gpu_manager.probe import DeclaredProbe, Poller, make_poller, make_probe
from gpu_manager.probe.history import INTERVAL_S as HISTORY_INTERVAL_S
from gpu_manager.probe.history import History, Sample
from gpu_manager.redact import redact_value
from gpu_manager.reload import Reloader
from gpu_manager.settings import Settings
from gpu_manager.shutdown import GracefulShutdown
from gpu_manager.state_store import StateStore
from gpu_manager.units import (
    Driver,
    EventBus,
    HealthChecker,
    HttpSleeper,
    Unit,
    make_driver,
)
from gpu_manager.units.checkpoint_sleep import CheckpointSleeper, make_checkpointer, on_gpu
from gpu_manager.units.drivers.native import OWNER_ENV, find_launched, kill_group
from gpu_manager.units.logrotate import LogRotator, native_logs

LOCK_INFO_EVERY_S = 0.25
PIDS_EVERY_S = 1.0


class Daemon(GracefulShutdown):
    def __init__(self, settings: Settings, inventory: Inventory | None = None,
                 bounds: Bounds = DEFAULT) -> None:
        self.settings = settings
        self.bounds = bounds
        self._inventory = inventory or load_inventory(settings.config_dir)
        self.started_at = time.time()
        self.bus = EventBus(settings.event_buffer)
        self.history = History()  # written only by the `history` task
        self.store = StateStore(settings.state_dir / "state.json")
        self.sim_dir = sim_dir(settings.state_dir)
        self.lock_info = LockInfo("unknown", None, None, ok=False, error="not checked yet")
        self.lock_checked_at = 0.0
        # monotonic time the current holder took the lock (None: free); written only by
        # refresh_lock_info, from what the backend says
        self.lock_held_since: float | None = None
        self._last_holder: str | None = None  # the holder at the last answer the lock gave
        self._lock_dirty = asyncio.Event()
        self.poller: Poller
        self.lock: GpuLock
        self.units: dict[str, Unit] = {}
        self.orchestrator: Orchestrator
        self.health = HealthChecker()
        # One HTTP client for every unit's sleep and wake (and Redis for the pause protocol);
        # `cuda-checkpoint` through the driver, for the service's pids on the GPU.
        self.sleeper_checkpoint = make_checkpointer(self._inventory.gpu.backend == "simulated",
                                                    self.sim_dir)
        self.sleeper = HttpSleeper(redis_url=settings.redis_url, checkpoint=CheckpointSleeper(
            self.sleeper_checkpoint,
            lambda name: on_gpu(self.orchestrator.ledger.view().unit_pids.get(name, ()),
                                self.poller.latest)))
        self._docker: Any = None  # the DockerEngine, made on first use
        self.probe_error: str | None = None
        self.owner = str(settings.state_dir.resolve())
        self.accepting = True
        self.start_s: float | None = None
        self.supervisor = Supervisor()
        self.door: RequestDoor | None = None  # the front door, when the API installs it
        self.unit_env: dict[str, str] = {}
        self.shutdown_deadline: float | None = None  # monotonic; set at the first SIGTERM
        self._shutdown_timer: asyncio.Task[None] | None = None
        # the API installs the status cache: invalidate() after a change it must show
        self.status_cache: Invalidates = NoCache()

    @property
    def inventory(self) -> Inventory:
        """The inventory in force: the orchestrator owns it once it exists (reloads swap it
        there, under the same serialisation as transitions)."""
        orch = getattr(self, "orchestrator", None)
        return orch.inventory if orch is not None else self._inventory

    # -- one factory for units and drivers, at start-up and on reload -------------------------
    def driver(self, name: str, cfg: ServiceConfig) -> Driver:
        s = self.settings
        return make_driver(name, cfg, log_dir=s.state_dir / "logs", docker=self.docker_engine,
                           extra_env=self.unit_env, log_max_bytes=s.child_log_max_bytes,
                           log_backups=s.child_log_backups)

    def unit(self, name: str, cfg: ServiceConfig) -> Unit:
        return Unit(name, cfg, self.driver(name, cfg), self.health, self.bus,
                    on_record=self.store.set_unit, restart_gate=self.orchestrator.restart_gate,
                    bounds=self.bounds, sleeper=self.sleeper, flush=self._flush)

    def _set_leases(self, cfg: LeaseConfig) -> None:
        self.leases.cfg = cfg

    async def _flush(self) -> bool:
        """Every record made so far on disk (an intent before its call), bounded."""
        return await asyncio.to_thread(self.store.wait_written, self.bounds.lock_io_s)

    async def start(self) -> None:
        t0 = time.monotonic()
        s, inv = self.settings, self.inventory
        # Before anything is read or adopted: a second daemon on this directory stops here
        # (StateDirBusy), having touched nothing.
        statedir.hold(s.state_dir)
        self.store.load()
        try:
            async with asyncio.timeout(self.bounds.startup_step_s):
                probe = await asyncio.to_thread(make_probe, inv.gpu, self.sim_dir)
        except TimeoutError:
            why = f"the GPU driver did not initialise within {self.bounds.startup_step_s:g}s"
            logger.error(f"!!! {why}: running DEGRADED on declared budgets !!!")
            probe = DeclaredProbe(inv.gpu.total_mb, inv.gpu.device, why)
        if isinstance(probe, DeclaredProbe):
            self.probe_error = probe.reason
        self.poller = make_poller(inv.gpu, probe, self.bounds.probe_sample_s)
        await self.poller.start()
        self.lock = make_lock(s.redis_url, s.lock_key, s.lock_ttl_ms)
        self.unit_env = {SIM_DIR_ENV: str(self.sim_dir), OWNER_ENV: self.owner}
        self.orchestrator = Orchestrator(
            inv, self.units, self.poller, self.lock, self.bus, self.store,
            lock_wait_s=s.lock_wait_s, reclaim_timeout_s=s.reclaim_timeout_s,
            on_lock_change=self._lock_dirty.set, bounds=self.bounds,
            queue_wait_s=s.queue_wait_s,
        )
        self.orchestrator.redis_url = s.redis_url
        self.orchestrator.serial_plans = s.plan_mode == "serial"
        for name, cfg in inv.services.items():
            unit = self.unit(name, cfg)
            unit.start_loop()
            self.units[name] = unit
        await self._adopt()
        await self.orchestrator.refresh_pids()
        self.leases = LeaseManager(self.orchestrator, inv.leases)
        self.reloader = Reloader(s.config_dir, self.orchestrator, self, self._set_leases)
        self.reloader.start()
        # Native services' logs roll over by size while they run (bounded disk use).
        self.logrotate = LogRotator(lambda: native_logs(self.units), s.child_log_max_bytes,
                                    s.child_log_backups, every_s=s.child_log_check_s)
        sup = self.supervisor
        sup.spawn("gpu-lock", self.orchestrator.keeper.watch)
        sup.spawn("lock-info", self._refresh_lock_info)
        sup.spawn("unit-pids", self._refresh_pids)
        sup.spawn("lease-expiry", self.leases.expire_loop)
        sup.spawn("config-watch", self.reloader.watch)
        sup.spawn("child-log-rotation", self.logrotate.run)
        sup.spawn("history", self._sample_history)
        await self.refresh_lock_info()
        if any(c.sleep is not None and c.sleep.api == "cuda-checkpoint"
               for c in inv.services.values()):  # asked once: the driver does not change
            self.orchestrator.checkpoint_cap = await self.sleeper_checkpoint.capability()
        self.start_s = time.monotonic() - t0  # the rebuild after a restart: adoption included
        for issue in inv.warnings:
            logger.warning(f"config: {issue}")
        logger.info(f"view rebuilt in {self.start_s:.3f}s; "
                    f"gpu-manager up: {inv.summary()}; lock {self.lock.backend}; "
                    f"probe {self.poller.latest.source}")

    async def _adopt(self) -> None:
        """Rebuild the view from the record and from reality, after a restart or a crash.

        A unit is adopted from its record, else from what is found running: a process this
        daemon's state dir launched (it may have died before recording it), or the named
        container. A second live copy of a service is killed, so none is left unaccounted.
        """
        for op_id, data in list(self.store.operations.items()):
            self.store.set_operation(op_id, None)
            try:
                self.orchestrator.ops.add(interrupted(data))
            except Exception as exc:  # a record of any shape: reported, never fatal
                self.store.problems.append(f"operations.{op_id}: {exc!r}")
                logger.error(f"state file: operation {op_id} cannot be read ({exc!r}); "
                             "dropped")
                continue
            logger.warning(f"operation {op_id} ({data.get('request')}) was interrupted by a "
                           "daemon stop; its services are re-adopted below")
        try:
            async with asyncio.timeout(self.bounds.startup_step_s):
                launched = await asyncio.to_thread(find_launched, self.owner)
        except TimeoutError:
            logger.error("scanning for processes a previous daemon launched took over "
                         f"{self.bounds.startup_step_s:g}s; adopting from the record only")
            launched = {}
        for name in sorted(set(self.store.units) - set(self.units)):
            logger.warning(f"state names {name!r}, no longer in the inventory; left alone")
        for name, unit in self.units.items():
            candidates = [r for r in (self.store.units.get(name),) if r]
            candidates += launched.get(name, [])
            if isinstance(unit.cfg, DockerService):
                candidates.append({"kind": "docker", "id": unit.cfg.container.lstrip("/")})
            adopted: dict[str, Any] | None = None
            unknown = False
            for record in candidates:
                found = await unit.adopt(record)
                if found is None:  # e.g. the Docker engine is down: keep what we know
                    logger.error(f"{name}: cannot check whether it still runs; its record "
                                 "is kept for the next start")
                    unknown = True
                    break
                if found:
                    adopted = record
                    break
            if adopted is not None:
                logger.info(f"{name}: adopted {adopted}")
            elif name in self.store.units and not unknown:
                logger.info(f"{name}: recorded as running but gone; marking stopped")
                self.store.set_unit(name, None)
            if unknown:
                continue  # no second copy is killed on a guess
            token = adopted.get("token") if adopted else None
            for stray in launched.get(name, []):
                if stray["token"] != token:
                    logger.warning(f"{name}: killing a second copy (pid {stray['pid']})")
                    await asyncio.to_thread(kill_group, stray)

    async def stop(self) -> None:
        self.accepting = self.orchestrator.accepting = False
        if self._shutdown_timer is not None:
            self._shutdown_timer.cancel()
        await self._quietly("lease acquires", self.leases.close())
        await self._quietly("prewarm and wake-when-free", self.orchestrator.followups.settle())
        await self._quietly("background tasks", self.supervisor.close(self.bounds.shutdown_step_s))
        await self._quietly("units", asyncio.gather(*(u.close() for u in self.units.values())))
        await self._quietly("config watch", self.reloader.close())
        # leases do not survive the daemon; the lock goes whatever happened above
        await self._quietly("GPU lock release", self.orchestrator.keeper.release_all())
        await self._quietly("orchestrator", self.orchestrator.aclose())
        await self._quietly("poller", self.poller.stop())
        await self._quietly("lock backend", self.lock.close())
        await self._quietly("health checker", self.health.aclose())
        await self._quietly("sleep client", self.sleeper.aclose())
        if self._docker is not None:
            await self._quietly("Docker client", asyncio.to_thread(self._docker.close))
        # the last state is on disk before we exit
        await self._quietly("state file", self.store.aclose(self.bounds.shutdown_step_s))
        statedir.release(self.settings.state_dir)  # last: nothing of ours is written after
        logger.info("daemon stopped; managed services keep running unless stopped above")


    async def _quietly(self, what: str, aw: Awaitable[Any]) -> None:
        """One shutdown step: bounded, and its failure is logged, never raised."""
        bound = self.bounds.shutdown_step_s
        try:
            async with asyncio.timeout(bound):
                await aw
        except TimeoutError:
            logger.error(f"shutdown: {what} did not finish within {bound:g}s; going on")
        except Exception as exc:
            logger.opt(exception=exc).error(f"shutdown: {what} failed: {exc}; going on")

    def docker_engine(self) -> Any:
        if self._docker is None:
            from gpu_manager.units.drivers.docker import DockerEngine  # noqa: PLC0415

            self._docker = DockerEngine()
        return self._docker

    # -- background refreshers: requests read their results, never wait on Redis or /proc ---
    async def refresh_lock_info(self) -> None:
        """Read the lock's holder and TTL now (requests otherwise read the cached copy)."""
        try:
            async with asyncio.timeout(self.bounds.lock_io_s):
                self.lock_info = await self.lock.info()
        except TimeoutError:
            self.lock_info = LockInfo(self.lock.backend, None, None, ok=False,
                                      error=f"no answer within {self.bounds.lock_io_s:g}s")
        self.lock_checked_at = time.time()
        if not self.lock_info.ok:
            return  # unknown is not free: how long it has been held is kept, not restarted
        holder, before = self.lock_info.holder, self._last_holder
        self._last_holder = holder
        if holder is None:
            self.lock_held_since = None
        elif holder != before or self.lock_held_since is None:
            self.lock_held_since = time.monotonic()

    async def _refresh_lock_info(self) -> None:
        while True:
            self._lock_dirty.clear()
            await wait_event(self._lock_dirty, LOCK_INFO_EVERY_S)
            await self.refresh_lock_info()

    async def _sample_history(self) -> None:
        while True:
            for sample in self.history_samples():
                self.history.add(sample)
            await asyncio.sleep(HISTORY_INTERVAL_S)

    def history_samples(self) -> list[Sample]:
        """Each managed card now, from the latest snapshot and the books (no I/O)."""
        snap, orch = self.poller.latest, self.orchestrator
        observed = orch.observed()
        # rounded once here, so that `?since=` a served time is exact
        at = round(snap.wall_time or time.time(), 3)
        out = []
        for card in self.inventory.gpu.managed:
            dev = snap.device(card.index)
            used = {n: mb for n, u in list(self.units.items())
                    if u.holds_gpu and (mb := orch.measured(n, snap, card.index))}
            out.append(Sample(at, card.index, dev.total_mb if dev else None,
                              dev.used_mb if dev else None,
                              foreign_on(observed, card.index)
                              if dev and dev.used_mb is not None else None, used,
                              dev.temperature_c if dev else None,
                              dev.utilization_percent if dev else None))
        return out

    async def _refresh_pids(self) -> None:
        while True:
            await asyncio.sleep(PIDS_EVERY_S)
            await self.orchestrator.refresh_pids(prune=not self.orchestrator.busy)
            self.orchestrator.sample_host()

    # -- readiness ----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        snap = self.poller.latest
        degraded = snap.source == "declared"
        # `auto` may run degraded and still serve; an explicit `nvml` that cannot is not ready.
        probe_ok = not (degraded and self.inventory.gpu.backend == "nvml") and not (
            snap.error and snap.source != "declared")
        lock_ok = self.lock_info.ok
        detail = {
            "probe": {"ok": probe_ok, "source": snap.source, "degraded": degraded,
                      "error": snap.error, "age_s": round(time.monotonic() - snap.taken_at, 3)},
            "lock": {"ok": lock_ok, "backend": self.lock.backend, "error": self.lock_info.error},
            "accepting": self.accepting,
            "started_in_s": self.start_s,
            "config": {"ok": self.reloader.error is None, "error": self.reloader.error,
                       "reloads": self.reloader.reloads},
            "tasks": {"ok": self.supervisor.ok, "problems": self.supervisor.problems()},
            # what the state file held that could not be used (reported, not fatal)
            "state": {"problems": list(self.store.problems)},
        }
        # every error string here may quote a URL (the lock's, one from services.yaml)
        return (probe_ok and lock_ok and self.accepting and self.supervisor.ok,
                redact_value(detail))


def arm_exit_watchdog(seconds: float) -> None:
    """Exit the process `seconds` from now unless it has exited by then: after the bounded
    shutdown a thread stuck in a driver call (which no one can cancel) would otherwise keep
    the interpreter waiting for it forever."""
    def fire() -> None:
        stuck = [t.name for t in threading.enumerate()
                 if t is not threading.current_thread() and not t.daemon]
        logger.error(f"shutdown: threads still busy {seconds:g}s after the daemon stopped "
                     f"({', '.join(stuck) or 'none'}); exiting now")
        os._exit(0)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
