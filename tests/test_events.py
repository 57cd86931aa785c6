"""The event stream: ids, resuming with Last-Event-ID, gaps, pings, filters, shutdown.

The bus in-process first (ids, ring buffer, a slow reader), then the real daemon over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_manager.units.events import Event, EventBus, Gap
from tests.support.daemon import DaemonProc

# ---- the bus --------------------------------------------------------------------------------


def test_ids_increase_and_start_above_any_earlier_boot() -> None:
    first = EventBus()
    ids = [first.publish(Event("state", "a")).id for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [e.id for e in first.history] == ids
    later = EventBus()  # a restart: its first id is above everything the first boot sent
    assert later.publish(Event("state", "a")).id > ids[-1]


def test_since_replays_what_is_buffered_and_reports_the_rest_as_a_gap() -> None:
    bus = EventBus(history=3)
    ids = [bus.publish(Event("state", "a", {"n": n})).id for n in range(6)]
    gap, replay = bus.since(ids[3])  # still buffered: no gap, exactly what followed
    assert gap is None and [e.id for e in replay] == ids[4:]
    assert bus.since(ids[-1]) == (None, [])
    gap, replay = bus.since(ids[0])  # ids[1] and ids[2] fell out of the ring buffer
    assert gap == Gap(ids[0], ids[2], "too_old") and [e.id for e in replay] == ids[3:]
    gap, replay = bus.since(ids[0] - 10**9)  # an id of an earlier boot
    assert gap is not None and gap.reason == "restart" and [e.id for e in replay] == ids[3:]
    gap, _ = bus.since(ids[-1] + 5)  # an id this daemon never gave
    assert gap is not None and gap.reason == "restart"


async def test_a_slow_reader_is_told_what_it_lost() -> None:
    bus = EventBus()
    async with bus.subscribe(maxsize=2) as sub:
        ids = [bus.publish(Event("state", "a")).id for _ in range(5)]
        first = await asyncio.wait_for(sub.get(), 1)
        assert first == Gap(ids[0] - 1, ids[2], "slow_reader")
        rest = [await asyncio.wait_for(sub.get(), 1) for _ in range(2)]
        assert [e.id for e in rest if isinstance(e, Event)] == ids[3:]
        assert sub.get_nowait() is None


# ---- over HTTP ------------------------------------------------------------------------------


@dataclass
class Frame:
    id: int | None = None
    event: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)


class Listener:
    """Reads /gpu/events in a thread into `frames` until told to stop or the stream ends."""

    def __init__(self, d: DaemonProc, headers: dict[str, str] | None = None,
                 params: dict[str, Any] | None = None) -> None:
        self.frames: list[Frame] = []
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self._stop = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(d, headers, params),
                                        daemon=True)
        self._thread.start()

    def _run(self, d: DaemonProc, headers: dict[str, str] | None,
             params: dict[str, Any] | None) -> None:
        try:
            with httpx.stream("GET", f"{d.url}/gpu/events", headers=headers, params=params,
                              timeout=httpx.Timeout(30, read=60), trust_env=False) as resp:
                assert resp.status_code == 200, resp.read()
                assert resp.headers["content-type"].startswith("text/event-stream")
                frame = Frame()
                for line in resp.iter_lines():
                    if self._stop:
                        return
                    if line == "":
                        self._add(frame)
                        frame = Frame()
                    elif line.startswith(":"):
                        frame.comments.append(line[1:].strip())
                    elif line.startswith("id: "):
                        frame.id = int(line[4:])
                    elif line.startswith("event: "):
                        frame.event = line[7:]
                    elif line.startswith("data: "):
                        frame.data = json.loads(line[6:])
        except BaseException as exc:  # the test asserts on it
            self.error = exc
        finally:
            self.ended.set()
            with self._changed:
                self._changed.notify_all()

    def _add(self, frame: Frame) -> None:
        with self._changed:
            self.frames.append(frame)
            self._changed.notify_all()

    def events(self) -> list[Frame]:
        return [f for f in self.frames if f.event is not None]

    def wait(self, cond: Callable[[list[Frame]], bool], timeout: float = 15) -> list[Frame]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not cond(self.events()):
                left = deadline - time.monotonic()
                assert left > 0 and not self.ended.is_set(), (
                    f"condition not met: {self.error!r}; got "
                    f"{[(f.event, f.data.get('service')) for f in self.events()]}")
                self._changed.wait(left)
            return self.events()

    def wait_connected(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any("connected" in f.comments for f in self.frames):
                assert time.monotonic() < deadline and not self.ended.is_set(), self.error
                self._changed.wait(0.1)

    def close(self) -> None:
        self._stop = True


def op_ended(op_id: str) -> Callable[[list[Frame]], bool]:
    return lambda fs: any(f.event == "operation" and f.data.get("id") == op_id
                          and f.data.get("status") != "queued" for f in fs)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path_factory.mktemp("events")).start()
    yield d
    d.close()


def test_a_client_that_reconnects_gets_exactly_what_it_missed(daemon: DaemonProc) -> None:
    whole = Listener(daemon)  # stays connected: the reference for what was published
    first = Listener(daemon)
    whole.wait_connected()
    first.wait_connected()
    op1 = daemon.post("/gpu/prepare-phase/2").json()["operation_id"]
    seen = first.wait(op_ended(op1))
    first.close()
    last = max(f.id for f in seen if f.id is not None)
    # while it is away, another transition
    op2 = daemon.post("/gpu/prepare-phase/3").json()["operation_id"]
    missed = [f for f in whole.wait(op_ended(op2)) if f.id is not None and f.id > last]
    assert {f.data.get("service") for f in missed} >= {"vidi", "cosyvoice"}
    again = Listener(daemon, headers={"Last-Event-ID": str(last)})
    replayed = again.wait(op_ended(op2))
    assert [(f.id, f.event, f.data) for f in replayed] == [
        (f.id, f.event, f.data) for f in missed]
    # then the live ones, after the replay, none twice
    op3 = daemon.post("/gpu/prepare-phase/1").json()["operation_id"]
    end = next(f.id for f in again.wait(op_ended(op3)) if op_ended(op3)([f]))
    ids = [f.id for f in again.events() if f.id is not None and f.id <= end]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) and ids[0] == missed[0].id
    assert ids == [f.id for f in whole.wait(op_ended(op3))
                   if f.id is not None and last < f.id <= end]
    for listener in (whole, again):
        listener.close()


def test_an_id_from_another_run_gets_a_gap_first(daemon: DaemonProc) -> None:
    listener = Listener(daemon, params={"after": 1})
    frames = listener.wait(lambda fs: len(fs) >= 2)
    listener.close()
    assert frames[0].event == "gap" and frames[0].data["reason"] == "restart"
    assert frames[0].data["after"] == 1 and frames[1].id == frames[0].data["until"] + 1


def test_filters_apply_to_replay_and_live(daemon: DaemonProc) -> None:
    whole = Listener(daemon)
    whole.wait_connected()
    op = daemon.post("/gpu/prepare-phase/2").json()["operation_id"]
    start = whole.wait(op_ended(op))[0].id
    assert start is not None
    vidi = Listener(daemon, headers={"Last-Event-ID": str(start - 1)},
                    params={"service": "vidi", "kind": "state"})
    frames = vidi.wait(lambda fs: any(f.data.get("state") == "ready" for f in fs))
    assert frames and all(f.event == "state" and f.data["service"] == "vidi" for f in frames)
    for listener in (whole, vidi):
        listener.close()


def test_a_malformed_last_event_id_is_a_clear_error(daemon: DaemonProc) -> None:
    r = daemon.get("/gpu/events", headers={"Last-Event-ID": "yesterday"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


def test_small_buffer_gap_pings_and_a_clean_end_at_shutdown(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, env={"GPU_MANAGER_EVENT_BUFFER": "4",
                                  "GPU_MANAGER_SSE_PING_S": "0.3"}).start()
    try:
        whole = Listener(d)
        whole.wait_connected()
        op = d.post("/gpu/prepare-phase/2").json()["operation_id"]
        frames = whole.wait(op_ended(op))
        assert len(frames) > 5
        first = frames[0].id
        assert first is not None
        late = Listener(d, headers={"Last-Event-ID": str(first)})
        got = late.wait(lambda fs: len(fs) >= 5)
        assert got[0].event == "gap" and got[0].data["reason"] == "too_old"
        assert got[0].data["after"] == first
        assert [f.id for f in got[1:5]] == [f.id for f in frames[-4:]]
        assert got[0].data["until"] == frames[-5].id
        # an idle stream is kept open by pings
        deadline = time.monotonic() + 5
        while not any(c.startswith("ping") for f in late.frames for c in f.comments):
            assert time.monotonic() < deadline, "no keep-alive ping on an idle stream"
            time.sleep(0.05)
        # SIGTERM: the stream says so and ends; the daemon exits
        d.kill(signal.SIGTERM)
        assert late.ended.wait(10), "the stream did not end at shutdown"
        assert late.events()[-1].event == "shutdown" and late.error is None
        assert d.proc is not None and d.proc.wait(20) is not None
    finally:
        d.close()


class StubDaemon:
    """What the stream reads of a daemon (its bus and settings), for in-process tests where
    the interleaving of publishing and streaming must be certain."""

    def __init__(self) -> None:
        from gpu_manager.settings import Settings

        self.bus = EventBus()
        self.settings = Settings()

    def stream(self, since: int | None) -> Any:
        import anyio

        from gpu_manager.api.events import _stream

        return _stream(self, since, [], [], anyio.Event())  # type: ignore[arg-type]


async def test_events_published_during_the_replay_are_sent_once() -> None:
    # In-process, so the interleaving is certain: events land in the buffer and in the
    # stream's queue both while it is between subscribing and reading the buffer.
    stub = StubDaemon()
    before = stub.bus.publish(Event("state", "a")).id
    stream = stub.stream(before)
    hello = await stream.__anext__()
    assert hello.comment == "connected"
    ids = [stub.bus.publish(Event("state", "a", {"n": n})).id for n in range(3)]
    got = [int((await asyncio.wait_for(stream.__anext__(), 1)).id) for _ in range(3)]
    assert got == ids
    late = stub.bus.publish(Event("state", "b")).id
    assert int((await asyncio.wait_for(stream.__anext__(), 1)).id) == late
    await stream.aclose()


async def test_an_id_this_daemon_never_gave_does_not_hide_what_follows() -> None:
    stub = StubDaemon()
    first = stub.bus.publish(Event("state", "a")).id
    stream = stub.stream(first + 10**6)
    assert (await stream.__anext__()).comment == "connected"
    gap = await asyncio.wait_for(stream.__anext__(), 1)
    assert gap.event == "gap" and json.loads(gap.data)["reason"] == "restart"
    assert int((await asyncio.wait_for(stream.__anext__(), 1)).id) == first  # replayed
    live = stub.bus.publish(Event("state", "b")).id
    assert int((await asyncio.wait_for(stream.__anext__(), 1)).id) == live
    await stream.aclose()


async def test_a_queue_overflow_during_the_replay_is_no_gap_when_the_replay_covered_it() -> None:
    # Published between subscribing and reading the buffer, these events overflow the
    # stream's small queue; the replay sends them all, so the queue's loss is no loss.
    stub = StubDaemon()
    stub.settings = stub.settings.model_copy(update={"sse_queue": 2})
    before = stub.bus.publish(Event("state", "a")).id
    stream = stub.stream(before)
    assert (await stream.__anext__()).comment == "connected"
    ids = [stub.bus.publish(Event("state", "a", {"n": n})).id for n in range(5)]
    got = [await asyncio.wait_for(stream.__anext__(), 1) for _ in range(5)]
    assert [(f.event, int(f.id)) for f in got] == [("state", i) for i in ids]
    live = stub.bus.publish(Event("state", "b")).id
    after = await asyncio.wait_for(stream.__anext__(), 1)
    assert (after.event, int(after.id)) == ("state", live), "a gap for events already sent"
    await stream.aclose()


def test_an_acquire_that_waits_is_announced_and_so_is_its_end(daemon: DaemonProc) -> None:
    leases = Listener(daemon, params={"kind": "lease"})
    leases.wait_connected()
    try:
        daemon.post("/gpu/release-all")
        held = daemon.post("/gpu/acquire", json={"session_id": "ev-holder", "requester": "a",
                                                 "ttl_s": 60})  # the whole budget
        assert held.json()["success"], held.text
        late = daemon.post("/gpu/acquire", json={"session_id": "ev-late", "requester": "b",
                                                 "vram_mb": 1000, "timeout_ms": 1500})
        assert late.json()["success"] is False, late.text
        frames = leases.wait(lambda fs: any(f.data.get("session_id") == "ev-late"
                                            and f.data["status"] == "timeout" for f in fs))
        mine = [f.data for f in frames if f.data.get("session_id") == "ev-late"]
        assert [m["status"] for m in mine] == ["waiting", "timeout"]
        assert mine[0]["vram_mb"] == 1000 and mine[0]["reason"]
        assert "timed out" in mine[1]["reason"]
        # one that is granted at once is not announced as waiting
        assert [f.data["status"] for f in frames
                if f.data.get("session_id") == "ev-holder"] == ["acquired"]
    finally:
        daemon.post("/gpu/release", json={"session_id": "ev-holder"})
        leases.close()
