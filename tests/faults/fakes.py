"""In-process fakes for fault injection: a GPU, its probe, drivers, a health checker and the
services' sleep/wake APIs, each of which can be told to raise, hang or answer late at any of its
await points. They complement the real-process tests (which cannot make a driver hang on
cue); they never replace them.

`World` wires real daemon parts (units, orchestrator, ledger, poller, memory lock, lease
manager, supervisor) to these fakes, with `Bounds.fast()` so a hang costs a fraction of a
second.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

from gpu_manager.aio import Supervisor
from gpu_manager.bounds import Bounds
from gpu_manager.config import (
    HealthConfig,
    Inventory,
    ServiceConfig,
    SleepConfig,
    load_inventory,
)
from gpu_manager.lock import MemoryLock
from gpu_manager.orchestrator import Orchestrator
from gpu_manager.orchestrator.leases import LeaseManager
from gpu_manager.probe import DeviceSnapshot, GpuProcess, Poller, Snapshot
from gpu_manager.state_store import StateStore
from gpu_manager.units import (
    DriverError,
    EventBus,
    ExitInfo,
    HealthChecker,
    Outcome,
    RestartPolicy,
    Unit,
)
from gpu_manager.units.drivers.base import ExitWatch

FaultKind = Literal["raise", "hang", "late", "bug", "invalid-url"]
FAULT_KINDS: tuple[FaultKind, ...] = ("raise", "hang", "late", "bug", "invalid-url")
HANG_S = 3600.0
_pids = itertools.count(7_000_000)  # above any real pid_max: psutil never finds them


@dataclass
class Fault:
    kind: FaultKind
    delay_s: float = 0.15

    def error(self, where: str) -> Exception:
        if self.kind == "invalid-url":
            return httpx.InvalidURL(f"injected at {where}: invalid URL")
        if self.kind == "bug":
            return RuntimeError(f"injected bug at {where}")
        return DriverError(f"injected failure at {where}")


class Faults:
    """Armed faults, each consumed by the next call at its (service, point)."""

    def __init__(self) -> None:
        self._armed: dict[tuple[str, str], list[Fault]] = {}
        self._lock = threading.Lock()
        self.hit_count = 0

    def arm(self, service: str, point: str, fault: Fault) -> None:
        with self._lock:
            self._armed.setdefault((service, point), []).append(fault)

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def _take(self, service: str, point: str) -> Fault | None:
        with self._lock:
            queue = self._armed.get((service, point))
            if not queue:
                return None
            self.hit_count += 1
            return queue.pop(0)

    async def hit(self, service: str, point: str) -> None:
        fault = self._take(service, point)
        if fault is None:
            return
        if fault.kind == "hang":
            await asyncio.sleep(HANG_S)
        elif fault.kind == "late":
            await asyncio.sleep(fault.delay_s)
        else:
            raise fault.error(f"{service}.{point}")

    def hit_sync(self, service: str, point: str, hang_s: float) -> None:
        """For the probe's own thread: a hang blocks it for `hang_s` (a stuck driver call)."""
        fault = self._take(service, point)
        if fault is None:
            return
        if fault.kind == "hang":
            time.sleep(hang_s)
        elif fault.kind == "late":
            time.sleep(fault.delay_s)
        else:
            raise fault.error(f"{service}.{point}")


class FakeGpu:
    """VRAM by pid, with a release delay like a real driver's teardown. Thread-safe (the
    probe reads it from the poller's thread)."""

    def __init__(self, total_mb: int, release_delay_s: float = 0.05) -> None:
        self.total_mb = total_mb
        self.release_delay_s = release_delay_s
        self.foreign_mb = 0
        self._live: dict[int, tuple[str, int]] = {}
        self._leaving: dict[int, tuple[str, int, float]] = {}
        self._lock = threading.Lock()
        self.oom: list[str] = []
        self.peak_mb = 0

    def _used(self, now: float) -> int:
        leaving = sum(mb for _, mb, until in self._leaving.values() if until > now)
        return sum(mb for _, mb in self._live.values()) + leaving + self.foreign_mb

    def alloc(self, pid: int, name: str, mb: int) -> None:
        with self._lock:
            used = self._used(time.monotonic())
            if used + mb > self.total_mb:  # CUDA would fail this allocation: out of memory
                self.oom.append(f"{name} needed {mb} MB with {used} of {self.total_mb} used")
            self._live[pid] = (name, mb)
            self.peak_mb = max(self.peak_mb, used + mb)

    def set_mb(self, pid: int, mb: int) -> None:
        with self._lock:
            if pid in self._live:
                name, old = self._live[pid]
                if mb < old:
                    self._leaving[-pid] = (name, old - mb, time.monotonic() + self.release_delay_s)
                self._live[pid] = (name, mb)

    def free(self, pid: int) -> None:
        with self._lock:
            entry = self._live.pop(pid, None)
            if entry is not None:
                self._leaving[pid] = (*entry, time.monotonic() + self.release_delay_s)

    def sample(self) -> tuple[int, list[GpuProcess]]:
        with self._lock:
            now = time.monotonic()
            for pid in [p for p, (_, _, until) in self._leaving.items() if until <= now]:
                del self._leaving[pid]
            procs = {pid: mb for pid, (_, mb) in self._live.items()}
            for pid, (_, mb, _) in self._leaving.items():
                if pid > 0:  # a dying process is still listed until the driver lets go
                    procs[pid] = procs.get(pid, 0) + mb
            return self._used(now), [GpuProcess(pid, "fake", mb, "simulated")
                                     for pid, mb in procs.items()]


class FakeProbe:
    source: Literal["simulated"] = "simulated"

    def __init__(self, gpu: FakeGpu, faults: Faults, hang_s: float) -> None:
        self.gpu, self.faults, self.hang_s = gpu, faults, hang_s

    def sample(self, processes: bool) -> Snapshot:
        self.faults.hit_sync("gpu", "sample", self.hang_s)
        used, procs = self.gpu.sample()
        total = self.gpu.total_mb
        dev = DeviceSnapshot(0, "fake", None, total, used, max(0, total - used),
                             processes=tuple(procs) if processes else None,
                             processes_at=time.monotonic() if processes else None)
        return Snapshot("simulated", time.monotonic(), time.time(), (dev,))

    def close(self) -> None:
        pass


class FakeDriver(ExitWatch):
    """A 'process' that holds `vram_mb` on the fake GPU from launch until it is stopped."""

    def __init__(self, name: str, cfg: ServiceConfig, world: World) -> None:
        self.name, self.cfg, self.world = name, cfg, world
        self.pid: int | None = None
        self.dead = False  # died without the driver having been told (an event-stream gap)
        self._exit: asyncio.Future[ExitInfo] | None = None
        self.launches = 0
        self.pid_reads = 0

    @property
    def alive(self) -> bool:
        return self._exit is not None and not self._exit.done() and not self.dead

    async def start(self) -> None:
        await self.world.faults.hit(self.name, "start")
        if self.running():
            raise DriverError(f"{self.name} is already running")
        self.pid, self.dead, self.launches = next(_pids), False, self.launches + 1
        self._exit = asyncio.get_running_loop().create_future()
        self.world.gpu.alloc(self.pid, self.name, self.cfg.vram_mb)

    async def stop(self, timeout: float) -> ExitInfo:
        await self.world.faults.hit(self.name, "stop")
        if self._exit is None:
            return ExitInfo(None, detail="was not running")
        self._end(ExitInfo(None, 15))
        return await asyncio.shield(self._exit)

    def _end(self, info: ExitInfo) -> None:
        if self.pid is not None:
            self.world.gpu.free(self.pid)
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(info)

    def record(self) -> dict[str, Any] | None:
        return {"kind": "fake", "pid": self.pid} if self.running() else None

    async def adopt(self, record: dict[str, Any]) -> bool:
        await self.world.faults.hit(self.name, "adopt")
        return False

    async def pids(self) -> list[int]:
        self.pid_reads += 1
        await self.world.faults.hit(self.name, "pids")
        return [self.pid] if self.alive and self.pid is not None else []

    # -- what the world does to it ------------------------------------------------------------
    def crash(self, code: int = 1) -> None:
        if self.alive:
            self._end(ExitInfo(code, detail="crashed"))

    def die_unseen(self) -> None:
        """Die while nobody watches (Docker's event stream is reconnecting)."""
        if self.alive and self.pid is not None:
            self.world.gpu.free(self.pid)
            self.dead = True

    def reinspect(self) -> None:
        """The reconnect's re-inspection: a death in the gap is reported now."""
        if self.dead and self._exit is not None and not self._exit.done():
            self._exit.set_result(ExitInfo(137, detail="found dead on re-inspection"))


class FakeHealth(HealthChecker):
    """Healthy once the fake process has run `ready_after_s`; faults per service."""

    def __init__(self, world: World, ready_after_s: float = 0.03) -> None:
        super().__init__()
        self.world, self.ready_after_s = world, ready_after_s
        self._started: dict[int, float] = {}

    async def check(self, cfg: HealthConfig) -> tuple[bool, str]:
        name = cfg.url.rstrip("/").rsplit("/", 1)[-1]
        await self.world.faults.hit(name, "health")
        driver = self.world.current(name)
        if driver is None or not driver.alive or driver.pid is None:
            return False, "connection refused"
        since = self._started.setdefault(driver.pid, time.monotonic())
        if time.monotonic() - since < self.ready_after_s:
            return False, "HTTP 503"
        return True, "HTTP 200"


class World:
    """Real daemon parts on fake drivers, GPU and health checks (the orchestrator's view of
    a host, with every outside call under the test's control)."""

    def __init__(self, config_dir: Path, *, reclaim_timeout_s: float = 0.6,
                 bounds: Bounds | None = None) -> None:
        self.config_dir = config_dir
        self.bounds = bounds or Bounds.fast()
        self.faults = Faults()
        inv = load_inventory(config_dir)
        assert inv.gpu.total_mb is not None
        self.gpu = FakeGpu(inv.gpu.total_mb)
        self.poller = Poller(FakeProbe(self.gpu, self.faults, self.bounds.probe_sample_s * 2),
                             interval_s=0.05, process_interval_s=0.05, fast_interval_s=0.01,
                             reserve_mb=inv.gpu.reserve_mb,
                             sample_timeout_s=self.bounds.probe_sample_s)
        self.lock = MemoryLock()
        self.bus = EventBus()
        self.store = StateStore(config_dir / "state.json")
        self.units: dict[str, Unit] = {}
        self.drivers: list[FakeDriver] = []  # every driver ever made, to find leaks
        self.health = FakeHealth(self)
        self.orch = Orchestrator(inv, self.units, self.poller, self.lock, self.bus, self.store,
                                 reclaim_timeout_s=reclaim_timeout_s, bounds=self.bounds)
        self.leases = LeaseManager(self.orch, inv.leases)
        self.supervisor = Supervisor(base_s=0.05, max_s=0.2)
        self.policy = RestartPolicy(base_s=0.05, max_s=0.3, limit=5, window_s=5)
        for name, cfg in inv.services.items():
            self.units[name] = self.unit(name, cfg)

    @property
    def inventory(self) -> Inventory:
        return self.orch.inventory

    # -- the UnitFactory the orchestrator uses on reload --------------------------------------
    def driver(self, name: str, cfg: ServiceConfig) -> FakeDriver:
        driver = FakeDriver(name, cfg, self)
        self.drivers.append(driver)
        return driver

    def unit(self, name: str, cfg: ServiceConfig) -> Unit:
        driver = self.driver(name, cfg)
        return Unit(name, cfg, driver, self.health, self.bus, on_record=self.store.set_unit,
                    restart_gate=self.orch.restart_gate, policy=self.policy,
                    bounds=self.bounds, sleeper=self)

    async def start(self) -> None:
        await self.poller.start()
        for unit in self.units.values():
            unit.start_loop()
        self.supervisor.spawn("lease-expiry", self.leases.expire_loop)
        self.supervisor.spawn("gpu-lock", self.orch.keeper.watch)

    async def close(self) -> None:
        await self.leases.close()
        await self.supervisor.close(2)
        await asyncio.gather(*(u.close() for u in self.units.values()))
        await self.orch.keeper.release_all()
        await self.orch.aclose()
        await self.poller.stop()
        await self.health.aclose()
        self.store.close()

    def current(self, name: str) -> FakeDriver | None:
        unit = self.units.get(name)
        return unit.driver if unit is not None and isinstance(unit.driver, FakeDriver) else None

    def driver_of(self, name: str) -> FakeDriver:
        driver = self.current(name)
        assert driver is not None
        return driver

    # -- sleep and wake, faked at their boundary (the service's HTTP API) ---------------------
    async def sleep(self, name: str, cfg: SleepConfig, requester: str,
                    reason: str) -> Outcome:
        """Fault point "release": late (answers, frees nothing), hang, raise; else the
        service keeps half its declared residual."""
        fault = self.faults._take(name, "release")
        if fault is not None:
            if fault.kind == "late":
                # answers, but keeps its memory: the orchestrator must find out on the GPU
                return Outcome(True, f"{cfg.api} acknowledged (memory kept)")
            if fault.kind == "hang":
                await asyncio.sleep(HANG_S)
            raise fault.error(f"{name}.release")
        driver = self.current(name)
        if driver is not None and driver.alive and driver.pid is not None:
            self.gpu.set_mb(driver.pid, (cfg.residual_mb or 0) // 2)
        return Outcome(True, f"{cfg.api}: released")

    async def asleep(self, name: str, cfg: SleepConfig) -> bool | None:
        """The fake services cannot say (as SGLang, ComfyUI): the record and the GPU do."""
        return None

    async def wake(self, name: str, cfg: SleepConfig, memo: tuple[str, ...]) -> Outcome:
        """Fault point "resume": refuse (a CUDA OOM answer: still asleep), hang, raise."""
        fault = self.faults._take(name, "resume")
        if fault is not None:
            if fault.kind == "late":
                return Outcome(False, "CUDA out of memory (injected)")
            if fault.kind == "hang":
                await asyncio.sleep(HANG_S)
            raise fault.error(f"{name}.resume")
        driver = self.current(name)
        if driver is not None and driver.alive and driver.pid is not None:
            self.gpu.set_mb(driver.pid, 0)
            self.gpu.alloc(driver.pid, name, driver.cfg.vram_mb)  # checks the budget, as CUDA
        return Outcome(True, "woke")


def write_config(dest: Path, services: str, phases: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "services.yaml").write_text(services)
    (dest / "phases.yaml").write_text(phases)


def service_yaml(name: str, mb: int, priority: int, *, extra: str = "",
                 health: bool = True) -> str:
    check = (f"\n    health: {{url: 'http://fake.test/{name}', timeout_s: 0.2, interval_s: 0.1,"
             " startup_interval_s: 0.02}") if health else ""
    return (f"  {name}:\n    type: native\n    command: [fake-{name}]\n    vram_mb: {mb}\n"
            f"    priority: {priority}\n    start_timeout_s: 0.5\n    stop_timeout_s: 0.2"
            f"{check}{extra}\n")


GPU_YAML = "gpu: {backend: simulated, total_mb: 20000, reserve_mb: 1000}\n" \
           "leases: {default_ttl_s: 0.6, max_ttl_s: 2}\nservices:\n"

BASE_SERVICES = {
    "comfyui": service_yaml("comfyui", 12000, 100),
    "cosyvoice": service_yaml("cosyvoice", 4000, 50, extra="\n    restart: on-failure"),
    "vidi": service_yaml("vidi", 4000, 40),
    "ollama": service_yaml("ollama", 8000, 10, extra=(
        "\n    sleep: {api: ollama, url: 'http://fake.test/ollama', timeout_s: 0.2, "
        "wake_timeout_s: 0.3, residual_mb: 400}")),
    "whisper": service_yaml("whisper", 6000, 30, extra=(
        "\n    sleep: {api: pause, wake_when_free: true, timeout_s: 0.3, wake_timeout_s: 0.3, "
        "pause: {protocol: http, pause_url: 'http://fake.test/pause/whisper', "
        "resume_url: 'http://fake.test/resume/whisper', "
        "ack_timeout_s: 0.2, freed_timeout_s: 0.2}}")),
    "vllm": service_yaml("vllm", 5000, 20, extra=(
        "\n    sleep: {api: vllm, url: 'http://fake.test/vllm', timeout_s: 0.3, "
        "wake_timeout_s: 0.3, residual_mb: 600}")),
}

PHASES = {1: (["whisper"], []), 2: (["vidi"], []), 3: (["cosyvoice"], ["ollama"]),
          4: (["comfyui"], []), 5: (["vidi", "cosyvoice"], []),  # 5: two starts side by side
          6: (["vllm"], [])}


def base_config(dest: Path, services: dict[str, str] | None = None) -> None:
    """The fake host's inventory; phases name only the services that are in it."""
    services = BASE_SERVICES if services is None else services
    lines = ["phases:"]
    for n, (need, keep) in PHASES.items():
        need_, keep_ = [s for s in need if s in services], [s for s in keep if s in services]
        lines.append(f"  {n}: {{services: [{', '.join(need_)}], keep: [{', '.join(keep_)}]}}")
    write_config(dest, GPU_YAML + "".join(services.values()), "\n".join(lines) + "\n")
