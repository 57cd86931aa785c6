"""Native units with real processes and real HTTP health checks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from gpu_manager.units import NativeDriver, RestartPolicy, ServiceState
from gpu_manager.units.drivers.base import ExitInfo
from gpu_manager.units.drivers.native import MARKER_ENV
from tests.support.env import free_port, until
from tests.support.units import Harness, harness, health, workload

S = ServiceState


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path) as hh:
        yield hh


@pytest.fixture
def decoy() -> Iterator[psutil.Process]:
    """An innocent process whose command line matches the service's name (like
    nvidia-persistenced next to a pkill -f 'vidi'). It must survive every stop."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                             "nvidia-decoy", "vidi", "gpu_manager.sim.workload"])
    yield psutil.Process(proc.pid)
    proc.kill()
    proc.wait()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def family(tmp: Path, *flags: str) -> tuple[list[str], Path]:
    pidfile = tmp / f"family-{time.monotonic_ns()}.json"
    return ["{python}", "-m", "tests.support.family", "--pidfile", str(pidfile), *flags], pidfile


async def read_family(pidfile: Path) -> dict[str, object]:
    await until(pidfile.exists, 15, "the service to write its pids")
    data: dict[str, object] = json.loads(pidfile.read_text())
    return data


def tagged(token: str | None) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(MARKER_ENV) == token and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.Error:
            continue
    return out


async def test_stop_escalates_kills_the_whole_family_and_spares_the_decoy(
    h: Harness, tmp_path: Path, decoy: psutil.Process
) -> None:
    cmd, pidfile = family(tmp_path, "--ignore-sigterm", "--children", "2", "--grandchild")
    unit = h.native("vidi", cmd, stop_timeout_s=1.0)
    assert (await unit.ensure_ready()).ok
    pids = await read_family(pidfile)
    everyone = [pids["leader"], *pids["children"], pids["grandchild"]]  # type: ignore[list-item]
    assert all(alive(int(p)) for p in everyone)
    grandchild = psutil.Process(int(pids["grandchild"]))  # type: ignore[call-overload]
    assert os.getpgid(grandchild.pid) != pids["leader"], "the grandchild left the group"
    t0 = time.monotonic()
    result = await unit.stop()
    elapsed = time.monotonic() - t0
    assert result.ok and unit.state == S.STOPPED
    assert not [p for p in everyone if alive(int(p))]  # type: ignore[call-overload]
    assert 1.0 <= elapsed <= 1.0 + 0.1, f"stop took {elapsed:.3f}s for a 1 s stop timeout"
    assert decoy.is_running() and decoy.status() != psutil.STATUS_ZOMBIE
    assert unit.last_exit is not None and unit.last_exit.signal == signal.SIGKILL


async def test_graceful_stop_is_quick_and_reaps(h: Harness) -> None:
    port = free_port()
    unit = h.native("quick", workload(port), health=health(port))
    assert (await unit.ensure_ready()).ok
    driver = unit.driver
    assert isinstance(driver, NativeDriver) and driver.pid is not None
    pid = driver.pid
    t0 = time.monotonic()
    assert (await unit.stop()).ok
    assert time.monotonic() - t0 < 0.5
    assert unit.last_exit is not None and unit.last_exit.clean
    assert not psutil.pid_exists(pid), "the leader was not reaped"
    assert h.records["quick"] is None


async def test_exit_is_detected_within_50ms(h: Harness) -> None:
    port = free_port()
    unit = h.native("crashy", workload(port), health=health(port))
    assert (await unit.ensure_ready()).ok
    driver = unit.driver
    assert isinstance(driver, NativeDriver) and driver.pid is not None
    waiter = asyncio.create_task(driver.wait_exit())
    await asyncio.sleep(0)
    t0 = time.monotonic()
    os.kill(driver.pid, signal.SIGKILL)
    info = await waiter
    detected = time.monotonic() - t0
    assert info.signal == signal.SIGKILL
    assert detected < 0.05, f"exit noticed after {detected * 1000:.1f} ms"
    t_failed = await h.wait_state(unit, S.FAILED, 2)
    assert t_failed - t0 < 0.2
    assert "killed by signal 9 while ready" in unit.reason


async def test_ready_within_one_check_interval_of_healthy(h: Harness) -> None:
    port = free_port()
    unit = h.native("slow", workload(port, "--startup-s", "0.5"),
                    health=health(port, startup_interval_s=0.1))
    result = await unit.ensure_ready()
    assert result.ok and result.state == S.READY
    ready_event_at = [at for state, at in h.states("slow") if state == "ready"][-1]
    body = httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).json()
    lag = ready_event_at - body["ready_at"]
    assert 0 <= lag <= 0.1 + 0.05, f"ready {lag * 1000:.0f} ms after the service was healthy"
    assert result.duration_s >= 0.5


async def test_never_healthy_fails_at_start_timeout_and_leaves_nothing(h: Harness) -> None:
    port = free_port()
    unit = h.native("stuck", workload(port, "--startup-s", "60"), health=health(port),
                    start_timeout_s=1.0, stop_timeout_s=2.0)
    t0 = time.monotonic()
    result = await unit.ensure_ready()
    elapsed = time.monotonic() - t0
    assert not result.ok and unit.state == S.FAILED
    assert "not healthy after 1s (last: HTTP 503)" in result.reason
    assert 1.0 <= elapsed < 1.6
    driver = unit.driver
    assert isinstance(driver, NativeDriver)
    assert not tagged(driver.token)
    assert h.records["stuck"] is None


async def test_start_error_is_clear(h: Harness) -> None:
    unit = h.native("ghost", ["/nonexistent/bin/server", "--port", "1"])
    result = await unit.ensure_ready()
    assert not result.ok and unit.state == S.FAILED
    assert "cannot start ghost: /nonexistent/bin/server: No such file or directory" in result.reason


async def test_stop_while_starting_aborts_the_start(h: Harness) -> None:
    port = free_port()
    unit = h.native("abort", workload(port, "--startup-s", "30"), health=health(port))
    start = asyncio.create_task(unit.ensure_ready())
    await h.wait_state(unit, S.STARTING, 5)
    driver = unit.driver
    assert isinstance(driver, NativeDriver)
    await until(lambda: driver.pid is not None, 5, "launch")
    stop = await unit.stop("operator changed their mind")
    result = await start
    assert stop.ok and not result.ok
    assert "stopped while starting" in result.reason
    assert unit.state == S.STOPPED and not tagged(driver.token)


async def test_unhealthy_then_death_is_failed_at_once(h: Harness) -> None:
    port = free_port()
    unit = h.native("flaky", workload(port, "--unhealthy-after-s", "0.8"),
                    health=health(port, interval_s=0.1))
    assert (await unit.ensure_ready()).ok
    await h.wait_state(unit, S.UNHEALTHY, 5)
    assert "health check failed: HTTP 500" in unit.reason
    driver = unit.driver
    assert isinstance(driver, NativeDriver) and driver.pid is not None
    os.kill(driver.pid, signal.SIGTERM)
    # a clean exit is stopped, not failed: the stand-in dies of the SIGTERM it handled, as
    # uvicorn's servers do (exit 143), which counts as clean (as systemd counts it)
    await h.wait_state(unit, S.STOPPED, 2)
    assert "stopped by signal 15 (SIGTERM) while unhealthy" in unit.reason


async def test_restart_with_backoff_then_start_limit(h: Harness) -> None:
    port = free_port()
    policy = RestartPolicy(base_s=0.2, max_s=5, limit=3, window_s=60)
    unit = h.native("crashloop", workload(port, "--crash-after-s", "0.3"), health=health(port),
                    restart="on-failure", policy=policy)
    assert (await unit.ensure_ready()).ok
    await h.wait_state(unit, S.FAILED, 15)
    await until(lambda: "start limit hit" in unit.reason, 15, "the start limit")
    starts = [at for state, at in h.states("crashloop") if state == "starting"]
    fails = [at for state, at in h.states("crashloop") if state == "failed"]
    assert len(starts) == 3 and unit.restarts.count == 2
    # each restart waits at least its backoff after the failure before it: 0.2 s, then 0.4 s
    gaps = [starts[i + 1] - fails[i] for i in range(2)]
    assert 0.2 <= gaps[0] < 0.4 and 0.4 <= gaps[1] < 0.7, gaps
    assert "3 failures in 60s" in unit.reason


async def test_adoption_after_daemon_restart(h: Harness, decoy: psutil.Process) -> None:
    port = free_port()
    first = h.native("vidi", workload(port), health=health(port))
    assert (await first.ensure_ready()).ok
    record = h.records["vidi"]
    assert record is not None
    first_driver = first.driver
    assert isinstance(first_driver, NativeDriver)
    pid = first_driver.pid
    await first.close()  # the daemon goes away; the service keeps running
    assert pid is not None and alive(pid)

    second = h.native("vidi", workload(port), health=health(port))
    assert await second.adopt(record)
    await h.wait_state(second, S.READY, 5)
    assert second.reason.startswith("healthy")
    # an adopted service's death is still noticed at once (pidfd, not polling)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    await h.wait_state(second, S.FAILED, 2)
    assert time.monotonic() - t0 < 0.1

    # a record whose pid now belongs to another process (the decoy) is not adopted
    reused = {**record, "pid": decoy.pid}
    third = h.native("vidi", workload(port), health=health(port))
    assert not await third.adopt(reused)
    assert third.state == S.STOPPED
    await third.stop()
    assert decoy.is_running()
    # nor is one whose create time does not match
    assert not await third.adopt({**record, "pid": os.getpid(), "create_time": 1.0})


async def test_unit_owner_survives_concurrent_commands(h: Harness) -> None:
    port = free_port()
    unit = h.native("busy", workload(port, "--startup-s", "0.2"), health=health(port))
    results = await asyncio.gather(*(unit.ensure_ready() for _ in range(5)))
    assert all(r.ok for r in results)
    driver = unit.driver
    assert isinstance(driver, NativeDriver)
    assert len(tagged(driver.token)) == 1, "concurrent ensure_ready started two copies"
    # applied strictly in the order sent: the start begun by ensure_ready is aborted by the
    # stop queued right behind it
    stops = await asyncio.gather(unit.stop(), unit.stop(), unit.ensure_ready(), unit.stop())
    assert [r.ok for r in stops] == [True, True, False, True]
    assert stops[1].reason == "not running"
    assert "stopped while starting" in stops[2].reason
    assert unit.state == S.STOPPED and not tagged(driver.token)


async def test_pid_reads_find_the_family_without_a_full_walk_each_time(
        h: Harness, tmp_path: Path, decoy: psutil.Process) -> None:
    cmd, pidfile = family(tmp_path, "--children", "2", "--grandchild")
    unit = h.native("fam", cmd, stop_timeout_s=2.0)
    assert (await unit.ensure_ready()).ok
    pids = await read_family(pidfile)
    everyone = {int(pids["leader"]), *map(int, pids["children"]),  # type: ignore[call-overload]
                int(pids["grandchild"])}  # type: ignore[call-overload]
    driver = unit.driver
    assert isinstance(driver, NativeDriver)
    first = set(await driver.pids())  # a full walk: the grandchild left the group
    assert first == everyone and decoy.pid not in first
    walks = 0
    full = driver._members

    def counted() -> list[psutil.Process]:
        nonlocal walks
        walks += 1
        return full()

    driver._members = counted  # type: ignore[method-assign]
    for _ in range(3):  # quick reads: the group by getpgid, the grandchild from the walk
        assert set(await driver.pids()) == everyone
    assert walks == 0
    assert (await unit.stop()).ok
    assert await driver.pids() == []


@pytest.mark.parametrize(("info", "clean", "text"), [
    (ExitInfo(0), True, "exited with code 0"),
    # uvicorn re-raises the SIGTERM it shut down on; a shell or a runtime reports 128 + it
    (ExitInfo(None, signal.SIGTERM), True, "stopped by signal 15 (SIGTERM)"),
    (ExitInfo(143), True, "exited with code 143 (SIGTERM)"),
    (ExitInfo(None, signal.SIGINT), True, "stopped by signal 2 (SIGINT)"),
    (ExitInfo(130), True, "exited with code 130 (SIGINT)"),
    (ExitInfo(None, signal.SIGKILL), False, "killed by signal 9"),
    (ExitInfo(137), False, "exited with code 137"),
    (ExitInfo(None, signal.SIGSEGV), False, "killed by signal 11"),
    (ExitInfo(1), False, "exited with code 1"),
    (ExitInfo(None, detail="exited while adopted; status unknown"), False,
     "exited while adopted; status unknown"),
])
def test_a_stop_by_the_polite_signals_is_clean(info: ExitInfo, clean: bool, text: str) -> None:
    assert (info.clean, info.describe()) == (clean, text)
