"""Bounded resources: child logs roll over while the child runs, the operation log keeps what
is in flight, state saves coalesce off the event loop and stay whole on disk."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

from gpu_manager.orchestrator.operations import Operation, OperationLog
from gpu_manager.planner import StartService
from gpu_manager.state_store import StateStore
from gpu_manager.units import NativeDriver, ServiceState
from gpu_manager.units.logrotate import LogRotator
from tests.support.daemon import DaemonProc
from tests.support.env import until, wait_for
from tests.support.units import harness

# Prints numbered 100-byte lines as fast as it can (a breather every 10): <1 MB/s of log.
CHATTY = ["{python}", "-u", "-c",
          "import itertools, time\n"
          "for i in itertools.count():\n"
          "    print(f'line {i:09d} ' + 'x' * 84)\n"
          "    if i % 10 == 0: time.sleep(0.001)\n"]


# -- child logs -------------------------------------------------------------------------------
def _numbers(path: Path) -> list[int]:
    return [int(m) for m in re.findall(rb"^line (\d{9}) ", path.read_bytes(), re.M)]


async def test_running_childs_log_rolls_over_and_child_keeps_writing(tmp_path: Path) -> None:
    max_bytes, backups = 64 * 1024, 3
    async with harness(tmp_path) as h:
        unit = h.native("chatty", CHATTY)
        assert (await unit.ensure_ready()).ok
        driver = unit.driver
        assert isinstance(driver, NativeDriver)
        log = driver.log_path
        rotator = LogRotator(lambda: [log], max_bytes, backups, every_s=0.05)
        rotator.start()
        try:
            await until(lambda: rotator.rotations >= 8, 30, "8 rollovers of the running log")
            sizes = {p.name: p.stat().st_size for p in log.parent.iterdir()}
            last_before = _numbers(log.with_name("chatty.log.1"))[-1]
            # The child keeps writing into the same (truncated) file, at its new end.
            # (read once per check: a rollover may truncate it between two reads)
            await until(lambda: bool(n := _numbers(log)) and n[-1] > last_before + 1000,
                        10, "new lines in the live log after a rollover")
        finally:
            await rotator.close()
        assert driver.running() and unit.state == ServiceState.READY
        names = sorted(p.name for p in log.parent.iterdir())
        assert names == ["chatty.log", "chatty.log.1", "chatty.log.2", "chatty.log.3"], names
        # O_APPEND: after a truncate the child writes at offset 0, so no hole of NULs.
        head = log.read_bytes()[:4096]
        # (-u: print's text and its newline are two writes; a truncate may fall between.)
        assert b"\0" not in head and head.lstrip(b"\n").startswith(b"line "), head[:40]
        # Each file holds about one check interval past the limit at most.
        total = sum(sizes.values())
        print(f"{rotator.rotations} rollovers; sizes {sizes}; total {total} bytes")
        assert all(size < 4 * max_bytes for size in sizes.values()), sizes
        assert total < (backups + 1) * 4 * max_bytes
        # The backups are consecutive: .2 ends where .1 begins, give or take a lost line or two.
        n2, n1 = _numbers(log.with_name("chatty.log.2")), _numbers(log.with_name("chatty.log.1"))
        assert 0 <= n1[0] - n2[-1] <= 50, (n2[-1], n1[0])


# -- the wait=false queue --------------------------------------------------------------------
def test_wait_false_queue_is_capped_with_429(tmp_path: Path) -> None:
    # comfyui takes 3 s to come up: the operations behind it stay queued meanwhile.
    d = DaemonProc(tmp_path, env={"GPU_MANAGER_MAX_PENDING_OPERATIONS": "2"},
                   replace={'"--startup-s", "1.5"': '"--startup-s", "3"'}).start()
    try:
        nowait = {"wait": "false"}
        first = d.post("/gpu/service/comfyui/start", params=nowait)
        second = d.post("/gpu/service/comfyui/stop", params=nowait)
        assert (first.status_code, second.status_code) == (202, 202)
        third = d.post("/gpu/service/vidi/start", params=nowait)
        assert third.status_code == 429, third.text
        body = third.json()
        assert body["error"] == "too_many_operations"
        assert (body["queued"], body["limit"]) == (2, 2) and "2 operations" in body["detail"]
        assert int(third.headers["Retry-After"]) > 0
        # a waiting request counts against the same cap
        assert d.post("/gpu/service/vidi/start").status_code == 429
        ids = [first.json()["operation_id"], second.json()["operation_id"]]
        assert [d.get(f"/gpu/operations/{i}").json()["status"] for i in ids] == [
            "running", "queued"]

        def finished() -> bool:
            return all(d.get(f"/gpu/operations/{i}").json()["status"] == "succeeded"
                       for i in ids)

        wait_for(finished, 30, "the two queued operations to finish")
        again = d.post("/gpu/service/vidi/start", params=nowait)
        assert again.status_code == 202, again.text
        op_id = again.json()["operation_id"]
        wait_for(lambda: d.get(f"/gpu/operations/{op_id}").json()["status"] == "succeeded",
                 30, "the accepted operation")
    finally:
        d.close()


# -- operation log ----------------------------------------------------------------------------
def _op(status: str) -> Operation:
    op = Operation(StartService("x"))
    op.status = status  # type: ignore[assignment]
    return op


def test_operation_log_never_evicts_in_flight() -> None:
    log = OperationLog(keep=5)
    running = [log.add(_op("running")) for _ in range(3)]
    finished = [log.add(_op("succeeded")) for _ in range(10)]
    # Over `keep`, the oldest *finished* ones go; the older in-flight ones stay.
    assert len(log) == 5
    assert all(log.get(op.id) is op for op in running)
    assert [op.id for op in log.recent(5)][3:] == [op.id for op in finished[-2:]]
    assert all(log.get(op.id) is None for op in finished[:-2])


def test_operation_log_grows_past_keep_only_while_all_in_flight() -> None:
    log = OperationLog(keep=3)
    ops = [log.add(_op("queued")) for _ in range(6)]
    assert len(log) == 6 and all(log.get(op.id) is op for op in ops)
    for op in ops[:4]:
        op.finish("succeeded")
    log.add(_op("running"))
    # 7 kept before: the 4 finished are the only candidates; 4 go, the in-flight 3 stay.
    assert len(log) == 3
    assert all(log.get(op.id) is None for op in ops[:4])
    assert all(log.get(op.id) is op for op in ops[4:])


# -- state store ------------------------------------------------------------------------------
def test_state_saves_coalesce_and_flush_holds_the_last_state(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    t0 = time.perf_counter()
    for i in range(1000):
        store.set_unit("svc", {"kind": "native", "pid": i, "create_time": float(i)})
    burst_s = time.perf_counter() - t0
    store.set_phase(2)
    assert store.wait_written(10)
    data = json.loads(store.path.read_text())
    assert data == {"units": {"svc": {"kind": "native", "pid": 999, "create_time": 999.0}},
                    "phase": 2, "operations": {}}
    # 1001 changes: every one of them would have been a write + fsync before.
    assert 1 <= store.writes <= 100, store.writes
    print(f"1001 changes -> {store.writes} writes; the burst took {burst_s * 1000:.1f} ms")
    store.close()
    # After close a change is written inline, still atomically.
    store.set_phase(3)
    assert json.loads(store.path.read_text())["phase"] == 3
    reloaded = StateStore(store.path)
    reloaded.load()
    assert reloaded.phase == 3 and reloaded.units["svc"]["pid"] == 999


def test_reader_during_a_burst_always_sees_whole_json(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.set_phase(1)
    assert store.wait_written(10)
    stop = threading.Event()
    reads: list[int] = []
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            text = store.path.read_text()
            try:
                json.loads(text)
            except ValueError:
                bad.append(text[:80])
            reads.append(len(text))

    thread = threading.Thread(target=reader)
    thread.start()
    big = "x" * 2000  # big enough that a torn write would be likely to be seen
    for i in range(3000):
        store.set_operation(f"op{i % 50}", {"i": i, "pad": big})
    assert store.wait_written(10)
    stop.set()
    thread.join(10)
    assert not bad, bad[:3]
    assert len(reads) > 10 and store.writes > 1
    assert json.loads(store.path.read_text())["operations"]["op49"]["i"] == 2999
    store.close()


def test_a_failing_write_is_retried_on_the_next_change(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the state dir is a file: every write fails
    store = StateStore(blocker / "state.json")
    store.set_phase(1)
    assert not store.wait_written(0.3)
    assert store.writes == 0
    blocker.unlink()
    store.set_phase(2)  # the writer survived the failure and writes this one
    assert store.wait_written(10)
    assert json.loads(store.path.read_text())["phase"] == 2
    store.close()
