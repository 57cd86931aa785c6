"""Checkpointing CUDA processes in place (gpu_manager/checkpoint/).

The ctypes layer runs against a stub libcuda.so.1 built by cc (tests/cuda_stub/cuda_stub.c)
and driven through its state file; each test loads its own copy of the library, so the
stub's per-pid states start afresh. The pids are real (sleeping) processes: the checkpointer
tells a dead pid from a driver's refusal. The simulated checkpointer runs against real
stand-in processes on a simulated GPU.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpu_manager.checkpoint import ProcessState
from gpu_manager.checkpoint.libcuda import LIBCUDA_ENV, LibcudaCheckpointer
from gpu_manager.checkpoint.simulated import SimulatedCheckpointer
from gpu_manager.probe import SimulatedProbe
from gpu_manager.sim.registry import CHECKPOINTED, RUNNING
from tests.support.env import unavailable, until, wait_for
from tests.support.workloads import Workload, health_status

S = ProcessState
STUB_SRC = Path(__file__).parent / "cuda_stub" / "cuda_stub.c"


@pytest.fixture(scope="session")
def cuda_stub_builder(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        unavailable("a C compiler is needed to build the libcuda stub "
                    "(Debian: apt-get install gcc)")
    built: dict[tuple[str, ...], Path] = {}

    def build(*defines: str) -> Path:
        key = tuple(sorted(defines))
        if key not in built:
            out = tmp_path_factory.mktemp("cuda-" + ("-".join(key) or "full").lower())
            res = subprocess.run(
                [cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-pthread",
                 *[f"-D{d}" for d in key], "-o", str(out / "libcuda.so.1"), str(STUB_SRC)],
                check=False, capture_output=True, text=True,
            )
            assert res.returncode == 0, f"building the libcuda stub failed:\n{res.stderr}"
            built[key] = out / "libcuda.so.1"
        return built[key]

    return build


class Stub:
    def __init__(self, tmp: Path) -> None:
        self.state, self.log = tmp / "cuda-state", tmp / "cuda-calls"

    def write(self, text: str) -> None:
        self.state.write_text(text)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def steps(self) -> list[str]:
        """The calls that change a state, in order ("lock 42", "restore 43", ...)."""
        return [" ".join(x.split()[:2]) for x in self.calls()
                if x.split()[0] not in ("init", "state")]


@pytest.fixture
def stub(cuda_stub_builder: Callable[..., Path], tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Callable[..., Stub]:
    def make(state: str = "", *defines: str) -> Stub:
        lib = tmp_path / "lib" / "libcuda.so.1"  # this test's own copy: fresh stub states
        lib.parent.mkdir()
        shutil.copy(cuda_stub_builder(*defines), lib)
        s = Stub(tmp_path)
        s.write(state)
        monkeypatch.setenv(LIBCUDA_ENV, str(lib))
        monkeypatch.setenv("CUDA_STUB_STATE", str(s.state))
        monkeypatch.setenv("CUDA_STUB_LOG", str(s.log))
        return s

    return make


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Three live processes to checkpoint (the stub takes any pid for a CUDA process)."""
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    yield [p.pid for p in procs]
    for p in procs:
        p.kill()
        p.wait(10)


# -- capability ---------------------------------------------------------------------------------
async def test_a_r570_driver_is_capable_and_initialised(stub: Callable[..., Stub]) -> None:
    s = stub()
    cap = await LibcudaCheckpointer().capability()
    assert cap.capable and cap.api_present and cap.reason is None
    assert cap.driver_version == 12080 and cap.driver is not None
    assert cap.driver.endswith("CUDA 12.8")
    assert "init 0" in s.calls()  # restore needs cuInit in the calling process


async def test_an_older_driver_is_refused_with_the_reason(stub: Callable[..., Stub],
                                                          pids: list[int]) -> None:
    s = stub("version 12020\n")
    ck = LibcudaCheckpointer()
    cap = await ck.capability()
    assert not cap.capable and cap.api_present and cap.driver_version == 12020
    assert cap.reason is not None and "CUDA 12.2" in cap.reason and "< 570" in cap.reason
    res = await ck.checkpoint(pids[:1], 5)
    o = res.of(pids[0])
    assert not res.ok and o.failed_call is None and o.error is not None
    assert o.error.startswith("not capable: driver") and o.state is S.UNKNOWN
    assert s.calls() == []  # nothing was asked of it


async def test_a_driver_without_the_symbols_is_refused(stub: Callable[..., Stub]) -> None:
    stub("", "OLD_DRIVER")
    cap = await LibcudaCheckpointer().capability()
    assert not cap.capable and not cap.api_present
    assert cap.reason is not None and "has no cuCheckpointProcessGetState" in cap.reason


async def test_no_library_and_a_failing_init_are_reasons(stub: Callable[..., Stub],
                                                         tmp_path: Path) -> None:
    cap = await LibcudaCheckpointer(str(tmp_path / "nope" / "libcuda.so.1")).capability()
    assert not cap.capable and cap.reason is not None and "not found" in cap.reason
    stub("init 100\n")
    cap = await LibcudaCheckpointer().capability()
    # a code the stub's cuGetErrorName does not know is named from our own table
    assert cap.reason == "cuInit failed: CUDA_ERROR_NO_DEVICE (100)"


# -- the sequences ------------------------------------------------------------------------------
async def test_checkpoint_and_restore(stub: Callable[..., Stub], pids: list[int]) -> None:
    s = stub()
    a, b, _ = pids
    ck = LibcudaCheckpointer()
    res = await ck.checkpoint([a, b], 5)
    assert res.ok and res.states() == {a: S.CHECKPOINTED, b: S.CHECKPOINTED}
    # all are locked before any is checkpointed
    assert s.steps() == [f"lock {a}", f"lock {b}", f"checkpoint {a}", f"checkpoint {b}"]
    timeout_ms = int(next(x for x in s.calls() if x.startswith("lock")).split()[2])
    assert 3000 < timeout_ms < 5000  # the driver's lock timeout, inside our deadline
    assert await ck.state(a) is S.CHECKPOINTED
    again = await ck.checkpoint([a], 5)
    assert again.ok and again.of(a).unchanged and len(s.steps()) == 4
    res = await ck.restore([a, b], 5)
    assert res.ok and res.states() == {a: S.RUNNING, b: S.RUNNING}
    assert s.steps()[4:] == [f"restore {a}", f"unlock {a}", f"restore {b}", f"unlock {b}"]


@pytest.mark.parametrize("code,name", [
    (401, "CUDA_ERROR_ILLEGAL_STATE"),
    (710, "CUDA_ERROR_ASSERT"),  # named by the driver's cuGetErrorName only
    (100, "CUDA_ERROR_NO_DEVICE"),  # unknown to the stub's cuGetErrorName: our table
    (4242, "unknown CUDA error"),
])
async def test_error_codes_are_named(stub: Callable[..., Stub], pids: list[int], code: int,
                                     name: str) -> None:
    stub(f"fail {pids[0]} lock {code}\n")
    o = (await LibcudaCheckpointer().checkpoint(pids[:1], 5)).of(pids[0])
    assert (o.ok, o.failed_call, o.code, o.error) == (False, "lock", code, f"{name} ({code})")
    assert o.state is S.RUNNING


async def test_a_partial_checkpoint_is_undone_in_reverse(stub: Callable[..., Stub],
                                                         pids: list[int]) -> None:
    a, b, c = pids
    s = stub(f"fail {c} checkpoint 801\n")
    res = await LibcudaCheckpointer().checkpoint(pids, 5)
    assert not res.ok and res.failed == (a, b, c)
    assert s.steps() == [f"lock {a}", f"lock {b}", f"lock {c}",
                         f"checkpoint {a}", f"checkpoint {b}", f"checkpoint {c}",
                         f"unlock {c}", f"restore {b}", f"unlock {b}", f"restore {a}",
                         f"unlock {a}"]
    oc = res.of(c)
    assert (oc.failed_call, oc.error, oc.state, oc.rolled_back) == (
        "checkpoint", "CUDA_ERROR_NOT_SUPPORTED (801)", S.RUNNING, False)
    for pid in (a, b):
        o = res.of(pid)
        assert o.rolled_back and o.state is S.RUNNING and o.failed_call is None
        assert o.error is not None and o.error.startswith(f"undone: pid {c} failed")


async def test_a_rollback_that_fails_says_where_each_pid_is(stub: Callable[..., Stub],
                                                            pids: list[int]) -> None:
    a, b, c = pids
    stub(f"fail {c} checkpoint 801\nfail {a} restore 2\n")
    res = await LibcudaCheckpointer().checkpoint(pids, 5)
    assert res.states() == {a: S.CHECKPOINTED, b: S.RUNNING, c: S.RUNNING}
    oa = res.of(a)
    assert oa.failed_call == "restore" and oa.code == 2 and not oa.rolled_back
    assert oa.error is not None and oa.error.endswith("restore: CUDA_ERROR_OUT_OF_MEMORY (2)")


async def test_a_failed_lock_unlocks_the_others(stub: Callable[..., Stub],
                                                pids: list[int]) -> None:
    a, b, c = pids
    s = stub(f"fail {b} lock 401\n")
    res = await LibcudaCheckpointer().checkpoint(pids, 5)
    assert s.steps() == [f"lock {a}", f"lock {b}", f"unlock {a}"]
    assert res.states() == {a: S.RUNNING, b: S.RUNNING, c: S.RUNNING}
    assert res.of(c).error is not None and res.of(c).error.startswith("not attempted")


async def test_a_failed_restore_is_reported_per_pid_and_not_retried(
        stub: Callable[..., Stub], pids: list[int]) -> None:
    a, b, c = pids
    s = stub()
    ck = LibcudaCheckpointer()
    assert (await ck.checkpoint(pids, 5)).ok
    s.write(f"fail {b} restore 2\n")
    res = await ck.restore(pids, 5)
    assert res.states() == {a: S.RUNNING, b: S.CHECKPOINTED, c: S.RUNNING}
    assert [o.ok for o in res.outcomes] == [True, False, True]
    assert res.of(b).error == "CUDA_ERROR_OUT_OF_MEMORY (2)"
    assert s.steps().count(f"restore {b}") == 1
    s.write("")
    res = await ck.restore(pids, 5)
    assert res.ok and [o.unchanged for o in res.outcomes] == [True, False, True]


async def test_a_call_past_the_deadline_is_a_timeout_outcome(stub: Callable[..., Stub],
                                                             pids: list[int]) -> None:
    a, b, _ = pids
    s = stub(f"sleep {b} checkpoint 3000\n")
    ck = LibcudaCheckpointer()
    t0 = time.monotonic()
    res = await ck.checkpoint([a, b], 1.0, cleanup_s=2)
    assert time.monotonic() - t0 < 2.5  # did not wait for the hung call
    ob = res.of(b)
    assert (ob.failed_call, ob.timed_out, ob.state) == ("checkpoint", True, S.UNKNOWN)
    assert res.of(a).rolled_back and res.of(a).state is S.RUNNING
    # while the call runs on, the pid is refused rather than raced inside the driver
    busy = (await ck.restore([b], 2)).of(b)
    assert busy.error == "busy: checkpoint of this pid is still running"
    assert s.steps().count(f"restore {b}") == 0
    # it ends on its own: the pid is then checkpointed and can be restored
    deadline = time.monotonic() + 10
    while await ck.state(b) is not S.CHECKPOINTED:
        assert time.monotonic() < deadline, "the hung checkpoint never ended"
        await asyncio.sleep(0.05)
    await until(lambda: not ck._inflight, 2, "the call's thread to end")
    assert (await ck.restore([b], 5)).states() == {b: S.RUNNING}


async def test_a_lock_that_waits_too_long_leaves_the_process_running(
        stub: Callable[..., Stub], pids: list[int]) -> None:
    s = stub(f"sleep {pids[0]} lock 10000\n")
    t0 = time.monotonic()
    o = (await LibcudaCheckpointer().checkpoint(pids[:1], 2.0)).of(pids[0])
    # the driver's own timeout ended the lock, inside our deadline
    assert time.monotonic() - t0 < 2.0
    assert (o.failed_call, o.error, o.timed_out, o.state) == (
        "lock", "CUDA_ERROR_NOT_READY (600)", True, S.RUNNING)
    assert s.steps() == [f"lock {pids[0]}"]


async def test_a_dead_pid_is_gone(stub: Callable[..., Stub]) -> None:
    stub()
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    o = (await LibcudaCheckpointer().checkpoint([proc.pid], 5)).of(proc.pid)
    assert (o.ok, o.state, o.error) == (False, S.GONE, "no such process")


# -- the simulated GPU ----------------------------------------------------------------------
@pytest.fixture
def probe(tmp_path: Path) -> SimulatedProbe:
    return SimulatedProbe(tmp_path / "sim", total_mb=8000, release_delay_ms=200)


@pytest.fixture
def standins() -> Iterator[list[Workload]]:
    started: list[Workload] = []
    yield started
    for w in started:
        w.stop()


def standin(probe: SimulatedProbe, standins: list[Workload], mb: int) -> Workload:
    w = Workload(probe.registry.root, mb)
    standins.append(w)
    w.wait_registered()
    return w


def held(probe: SimulatedProbe, pid: int) -> int | None:
    proc = probe.sample().devices[0].process(pid)
    return None if proc is None else proc.used_mb


async def test_simulated_checkpoint_frees_the_vram_and_restore_brings_it_back(
        probe: SimulatedProbe, standins: list[Workload]) -> None:
    w = standin(probe, standins, 3000)
    ck = SimulatedCheckpointer(probe.registry.root, checkpoint_s_per_gb=0.2,
                               restore_s_per_gb=0.1)
    cap = await ck.capability()
    assert cap.capable and cap.driver == "simulated"
    res = await ck.checkpoint([w.pid], 10)
    assert res.ok and res.of(w.pid).state is S.CHECKPOINTED
    assert res.seconds >= 3000 / 1024 * 0.2 - 0.01  # the copy takes its time
    assert held(probe, w.pid) == 0 and probe.sample().devices[0].free_mb == 8000
    assert w.proc.poll() is None and health_status(w.port) == 200  # alive, on the CPU
    reg = probe.registry.get(w.pid)
    assert (reg.cuda_state, reg.host_mb, reg.mb) == (CHECKPOINTED, 3000, 0)
    # a restarted daemon sees what was checkpointed, and can restore it
    again = SimulatedCheckpointer(probe.registry.root, restore_s_per_gb=0.1)
    assert await again.state(w.pid) is S.CHECKPOINTED
    res = await again.restore([w.pid], 10)
    assert res.ok and res.of(w.pid).state is S.RUNNING
    assert res.seconds >= 3000 / 1024 * 0.1 - 0.01
    assert held(probe, w.pid) == 3000
    reg = probe.registry.get(w.pid)
    assert (reg.cuda_state, reg.host_mb, reg.mb) == (RUNNING, 0, 3000)


async def test_simulated_restore_is_refused_until_there_is_room(
        probe: SimulatedProbe, standins: list[Workload]) -> None:
    w = standin(probe, standins, 3000)
    ck = SimulatedCheckpointer(probe.registry.root)
    assert (await ck.checkpoint([w.pid], 10)).ok
    other = standin(probe, standins, 6000)  # takes the room the checkpoint freed
    o = (await ck.restore([w.pid], 10)).of(w.pid)
    assert (o.ok, o.failed_call, o.error, o.state) == (
        False, "restore", "CUDA_ERROR_OUT_OF_MEMORY (2)", S.CHECKPOINTED)
    assert held(probe, w.pid) == 0 and held(probe, other.pid) == 6000
    other.stop()
    wait_for(lambda: held(probe, other.pid) is None, 5, "the other stand-in's VRAM to be freed")
    res = await ck.restore([w.pid], 10)
    assert res.ok and held(probe, w.pid) == 3000


async def test_a_checkpointed_standin_blocks_on_its_allocations(
        probe: SimulatedProbe, standins: list[Workload]) -> None:
    w = standin(probe, standins, 3000)
    ck = SimulatedCheckpointer(probe.registry.root)
    assert (await ck.checkpoint([w.pid], 10)).ok
    done = threading.Event()

    def allocate() -> None:  # what the stand-in's sleep/wake API does: a CUDA call
        probe.registry.resize(w.pid, 1000)
        done.set()

    threading.Thread(target=allocate, daemon=True).start()
    await asyncio.sleep(0.3)
    assert not done.is_set() and held(probe, w.pid) == 0
    assert (await ck.restore([w.pid], 10)).ok
    await until(done.is_set, 5, "the blocked allocation to go through after the unlock")
    assert held(probe, w.pid) == 1000


async def test_simulated_dead_pid_is_an_error(probe: SimulatedProbe,
                                              standins: list[Workload]) -> None:
    w = standin(probe, standins, 1000)
    w.stop()
    o = (await SimulatedCheckpointer(probe.registry.root).checkpoint([w.pid], 5)).of(w.pid)
    assert (o.ok, o.state, o.error) == (False, S.GONE, "no such process")
