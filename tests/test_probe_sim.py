"""The simulated GPU follows real processes; the poller serves snapshots without probing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gpu_manager.probe import Poller, SimulatedProbe, Snapshot
from gpu_manager.sim.registry import Registration, SimRegistry
from gpu_manager.sim.workload import EXIT_CRASH, EXIT_OOM
from tests.support.env import wait_for
from tests.support.workloads import Workload, health_status

RELEASE_MS = 300


@pytest.fixture
def sim(tmp_path: Path) -> SimulatedProbe:
    return SimulatedProbe(tmp_path / "sim", total_mb=8000, release_delay_ms=RELEASE_MS)


@pytest.fixture
def workloads(sim: SimulatedProbe) -> Iterator[list[Workload]]:
    started: list[Workload] = []
    yield started
    for w in started:
        w.stop()


def start(sim: SimulatedProbe, workloads: list[Workload], mb: int, *extra: str) -> Workload:
    w = Workload(sim.registry.root, mb, *extra)
    workloads.append(w)
    w.wait_registered()
    return w


def used(sim: SimulatedProbe) -> int:
    dev = sim.sample().devices[0]
    assert dev.used_mb is not None
    return dev.used_mb


def time_until_released(sim: SimulatedProbe, pid: int, timeout: float = 5) -> float:
    t0 = time.monotonic()
    wait_for(lambda: sim.sample().devices[0].process(pid) is None, timeout,
             f"pid {pid}'s memory to be released")
    return time.monotonic() - t0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_usage_follows_process_life_and_release_delay(
    sim: SimulatedProbe, workloads: list[Workload], sig: signal.Signals
) -> None:
    w = start(sim, workloads, 3000)
    snap = sim.sample()
    dev = snap.devices[0]
    assert (dev.total_mb, dev.used_mb, dev.free_mb) == (8000, 3000, 5000)
    proc = dev.process(w.pid)
    assert proc is not None and (proc.used_mb, proc.name) == (3000, "w")
    os.kill(w.pid, sig)
    w.proc.wait(10)
    # still counted right after death: the driver has not torn the context down yet
    assert sim.sample().devices[0].process(w.pid) is not None
    released = time_until_released(sim, w.pid)
    assert RELEASE_MS / 1000 - 0.05 <= released <= RELEASE_MS / 1000 + 0.5, released
    assert used(sim) == 0
    assert not list(sim.registry.procs.glob("*.json")), "expired registration not cleaned up"


def test_unreaped_zombie_holds_no_memory(sim: SimulatedProbe, workloads: list[Workload]) -> None:
    w = start(sim, workloads, 2000)
    os.kill(w.pid, signal.SIGKILL)
    wait_for(lambda: psutil.Process(w.pid).status() == psutil.STATUS_ZOMBIE, 5, "a zombie")
    time_until_released(sim, w.pid)  # released although the pid still exists
    assert psutil.pid_exists(w.pid)


def test_reused_pid_is_not_counted(sim: SimulatedProbe) -> None:
    # A registration naming a live pid with another create time: a reused pid, holds nothing.
    me = psutil.Process()
    path = sim.registry.procs / f"{me.pid}.json"
    path.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time() - 100,
                                "mb": 1000, "name": "old", "device": 0}))
    assert sim.sample().devices[0].process(me.pid) is not None  # within the release delay
    time_until_released(sim, me.pid)


def test_allocation_beyond_free_fails_like_cuda(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    start(sim, workloads, 6000)
    w = Workload(sim.registry.root, 3000, name="late")
    workloads.append(w)
    assert w.proc.wait(15) == EXIT_OOM
    assert "CUDA out of memory (simulated)" in w.proc.stderr.read() if w.proc.stderr else False
    (event,) = sim.registry.oom_events()
    assert (event["name"], event["mb"], event["free_mb"]) == ("late", 3000, 2000)
    assert used(sim) == 6000


def test_foreign_usage_via_cli(sim: SimulatedProbe, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("gpu-manager")
    env = {**os.environ, "GPU_MANAGER_SIM_DIR": str(sim.registry.root)}
    res = subprocess.run([str(exe), "sim", "foreign", "1500"], env=env, capture_output=True,
                         text=True, check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    dev = sim.sample().devices[0]
    assert (dev.used_mb, dev.free_mb, dev.processes) == (1500, 6500, ())
    res = subprocess.run([str(exe), "sim", "foreign", "0"], env=env, capture_output=True,
                         text=True, check=False, timeout=60)
    assert res.returncode == 0 and used(sim) == 0


def test_health_turns_ready_after_startup(sim: SimulatedProbe, workloads: list[Workload]) -> None:
    w = Workload(sim.registry.root, 100, "--startup-s", "0.6")
    workloads.append(w)
    t0 = time.monotonic()
    wait_for(lambda: health_status(w.port) is not None, 15, "the health endpoint")
    if time.monotonic() - t0 < 0.4:  # first answer came well inside the startup window
        assert health_status(w.port) == 503
    wait_for(lambda: health_status(w.port) == 200, 5, "ready")


def test_crash_after_and_ignore_sigterm(sim: SimulatedProbe, workloads: list[Workload]) -> None:
    crasher = start(sim, workloads, 100, "--crash-after-s", "0.3")
    assert crasher.proc.wait(10) == EXIT_CRASH
    stubborn = start(sim, workloads, 100, "--ignore-sigterm")
    os.kill(stubborn.pid, signal.SIGTERM)
    # a health round-trip after the signal proves the process handled it and lived on
    assert health_status(stubborn.port) == 200
    assert stubborn.proc.poll() is None
    os.kill(stubborn.pid, signal.SIGKILL)
    assert stubborn.proc.wait(10) == -signal.SIGKILL


class CountingProbe:
    """The real simulated probe, counting how often it is sampled."""

    def __init__(self, inner: SimulatedProbe) -> None:
        self.inner = inner
        self.source = inner.source
        self.samples: list[tuple[float, bool]] = []

    def sample(self, processes: bool = True) -> Snapshot:
        self.samples.append((time.monotonic(), processes))
        return self.inner.sample(processes)

    def close(self) -> None:
        self.inner.close()


async def test_poller_reads_are_free_and_fast_mode_is_fast(sim: SimulatedProbe) -> None:
    probe = CountingProbe(sim)
    poller = Poller(probe, interval_s=5, process_interval_s=5, fast_interval_s=0.05,
                    reserve_mb=500)
    await poller.start()
    try:
        assert len(probe.samples) == 1
        for _ in range(5000):
            assert poller.can_fit(7500) is True
            assert poller.can_fit(7501) is False
        assert len(probe.samples) == 1  # reads never reach the probe
        async with poller.fast():
            t0 = time.monotonic()
            await poller.wait_until(lambda s: False, 0.5)
            fast_polls = [t for t, procs in probe.samples if t >= t0]
        # 0.5 s at 50 ms is ~10 polls; allow for a busy 2-core machine
        assert 6 <= len(fast_polls) <= 12, len(fast_polls)
        assert all(procs for t, procs in probe.samples if t >= t0)
        n = len(probe.samples)
        await asyncio.sleep(0.3)  # back to the 5 s interval: no polls in this window
        assert len(probe.samples) <= n + 1
    finally:
        await poller.stop()


async def test_poller_sees_release_within_a_fast_poll(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    w = start(sim, workloads, 2500)
    poller = Poller(sim, interval_s=5, fast_interval_s=0.1)
    await poller.start()
    try:
        assert poller.latest.devices[0].process(w.pid) is not None
        async with poller.fast():
            os.kill(w.pid, signal.SIGKILL)
            await asyncio.to_thread(w.proc.wait, 10)
            died = time.monotonic()
            snap = await poller.wait_until(
                lambda s: s.devices[0].process(w.pid) is None, timeout=5)
            seen = time.monotonic() - died
        assert snap is not None and snap.devices[0].used_mb == 0
        # the release delay, plus at most one fast-poll interval and scheduling slack
        assert RELEASE_MS / 1000 - 0.05 <= seen <= RELEASE_MS / 1000 + 0.1 + 0.15, seen
    finally:
        await poller.stop()


async def test_poller_survives_a_failing_probe(sim: SimulatedProbe) -> None:
    class Flaky(CountingProbe):
        def sample(self, processes: bool = True) -> Snapshot:
            if len(self.samples) == 1:
                self.samples.append((time.monotonic(), processes))
                raise RuntimeError("driver hiccup")
            return super().sample(processes)

    poller = Poller(Flaky(sim), interval_s=0.02)
    await poller.start()
    try:
        bad = await poller.wait_until(lambda s: s.error is not None, 5)
        assert bad is not None and "driver hiccup" in (bad.error or "")
        assert bad.devices  # the last known devices are kept, with the error alongside
        good = await poller.wait_until(lambda s: s.error is None, 5)
        assert good is not None and poller.errors == 1
    finally:
        await poller.stop()


def test_registry_rejects_negative_foreign(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="negative"):
        SimRegistry(tmp_path).set_foreign(-1)


def post_busy(port: int, body: object) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/sim/busy", method="POST",
                                 data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def util(sim: SimulatedProbe, pid: int) -> int | None:
    proc = sim.sample().devices[0].process(pid)
    assert proc is not None
    return proc.util_pct


def test_sim_busy_shows_as_utilisation_until_it_ends(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    idle, busy = start(sim, workloads, 100), start(sim, workloads, 100, "--busy-pct", "55")
    assert (util(sim, idle.pid), util(sim, busy.pid)) == (0, 0)  # known to be idle, not None
    code, answer = post_busy(idle.port, {"seconds": 0.8, "util_pct": 77})
    assert code == 200 and isinstance(until := answer["busy_until"], float)
    assert time.time() < until <= time.time() + 0.8
    assert (util(sim, idle.pid), util(sim, busy.pid)) == (77, 0)
    assert post_busy(busy.port, {"seconds": 5})[0] == 200
    assert util(sim, busy.pid) == 55  # without util_pct: the stand-in's --busy-pct
    wait_for(lambda: util(sim, idle.pid) == 0, 0.8 + 2, "the busy period to end")
    assert time.time() >= until  # not before it was due
    for bad in ({}, {"seconds": -1}, {"seconds": 1, "util_pct": 101}, {"seconds": True}, []):
        assert post_busy(idle.port, bad)[0] == 400, bad
    assert util(sim, idle.pid) == 0


def test_registration_without_load_fields_still_loads(sim: SimulatedProbe) -> None:
    # a file written before the load fields existed: counted, idle, and still updatable
    me = psutil.Process()
    path = sim.registry.procs / f"{me.pid}.json"
    path.write_text(json.dumps({"pid": me.pid, "create_time": me.create_time(), "mb": 700,
                                "name": "old", "device": 0}))
    proc = sim.sample().devices[0].process(me.pid)
    assert proc is not None and (proc.used_mb, proc.util_pct) == (700, 0)
    sim.registry.set_in_flight(me.pid, 2, 90)
    assert util(sim, me.pid) == 90
    assert json.loads(path.read_text())["in_flight"] == 2
    sim.registry.set_in_flight(me.pid, 0, 90)
    assert util(sim, me.pid) == 0
    path.unlink()
    with pytest.raises(LookupError):
        sim.registry.set_busy(me.pid, time.time() + 1, 50)


def test_registration_util_pct() -> None:
    reg = Registration(1, 0.0, 10, "r")
    assert reg.util_pct(100.0) == 0
    serving = Registration(1, 0.0, 10, "r", in_flight=1, in_flight_pct=90)
    assert serving.util_pct(100.0) == 90
    held = Registration(1, 0.0, 10, "r", busy_until=101.0, busy_pct=40)
    assert (held.util_pct(100.0), held.util_pct(101.0)) == (40, 0)  # ends at busy_until
    both = Registration(1, 0.0, 10, "r", in_flight=3, in_flight_pct=60, busy_until=200.0,
                        busy_pct=80)
    assert both.util_pct(100.0) == 80  # the higher load
    dead = Registration(1, 0.0, 10, "r", dead_since=99.0, in_flight=1, in_flight_pct=90)
    assert dead.util_pct(100.0) == 0  # a dead process computes nothing
