"""Bounded resources: the operation log keeps what is in flight, state saves coalesce off the
event loop and stay whole on disk."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from gpu_manager.orchestrator.operations import Operation, OperationLog
from gpu_manager.planner import StartService
from gpu_manager.state_store import StateStore


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
