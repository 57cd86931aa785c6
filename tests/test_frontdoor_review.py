"""Faults found in review of the front door, each proved in process: a body that stalls the
event loop, a body that is a 500, an idle release that ignores a request that came and went,
and the turn-taking entry that outlives the requests it was for."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from gpu_manager.config.serve import ServeConfig
from gpu_manager.frontdoor.asgi import model_of
from gpu_manager.frontdoor.door import FrontDoor
from gpu_manager.frontdoor.errors import DoorError
from gpu_manager.frontdoor.idle import IdleState, IdleWatch
from gpu_manager.frontdoor.stats import DoorStats
from gpu_manager.orchestrator import OperationError
from gpu_manager.planner import Blocker, IdleSleep, Plan, Refusal, RequestStart, Step
from gpu_manager.units import ServiceState

S = ServiceState


@dataclass
class _Orch:
    """Only what the door's start asks: a dry run, and a submit that refuses."""

    refusal: Refusal | Plan | None = None
    submitted: list[str] = field(default_factory=list)
    op: asyncio.Future[None] | None = None  # the operation's outcome (default: refused)

    async def dry_run(self, request: Any) -> Any:
        return self.refusal

    def submit(self, request: Any) -> tuple[Any, asyncio.Future[None], bool]:
        self.submitted.append(request.name)
        fut = self.op
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(OperationError("insufficient_vram", "does not fit",
                                             blockers=[], short_mb=1))
        return SimpleNamespace(id="op-1"), fut, False


async def until(cond: Any, timeout: float = 2.0) -> None:
    """Wait (on the loop, which runs the door's tasks) for `cond`, at most `timeout`."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.005)


def _door(services: dict[str, tuple[ServiceState, dict[str, Any]]],
          orch: _Orch | None = None) -> FrontDoor:
    inv = SimpleNamespace(services={
        n: SimpleNamespace(serve=ServeConfig.model_validate(
            {"url": "http://127.0.0.1:9", **serve}), sleep=None, priority=10)
        for n, (_, serve) in services.items()})
    host = SimpleNamespace(
        inventory=inv, accepting=True, orchestrator=orch or _Orch(),
        units={n: SimpleNamespace(state=st) for n, (st, _) in services.items()},
        bounds=SimpleNamespace(pids_s=1.0),
        status_cache=SimpleNamespace(invalidate=lambda: None))
    return FrontDoor(host, DoorStats())


# -- bodies ----------------------------------------------------------------------------------
def test_a_multipart_body_is_read_in_linear_time() -> None:
    """The `model` of a multipart body was found by a regex that backtracks: 160 kB of
    `content-disposition:` took seconds, 64 MiB (the body limit) days, on the event loop."""
    body = b"content-disposition:" * 20000  # 400 kB
    t0 = time.perf_counter()
    assert model_of(body, "multipart/form-data; boundary=XX") is None
    assert time.perf_counter() - t0 < 0.5
    many = b"--XX\r\n\r\n" * 200000  # parts without end: bounded too
    t0 = time.perf_counter()
    assert model_of(many, "multipart/form-data; boundary=XX") is None
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize(("body", "model"), [
    (b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--XX--\r\n',
     "whisper-1"),
    (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="model"\r\n\r\nRIFF'
     b'\r\n--XX\r\ncontent-disposition: form-data; name=model\r\n\r\nm2\r\n--XX--\r\n', "m2"),
    (b'--XX\r\nContent-Disposition: form-data; filename="x"; name="model"\r\n'
     b'Content-Type: text/plain\r\n\r\n m3 \r\n--XX--', "m3"),
])
def test_the_multipart_model_field_is_found(body: bytes, model: str) -> None:
    assert model_of(body, "multipart/form-data; boundary=XX") == model


def test_deeply_nested_json_is_a_clear_400_not_a_crash() -> None:
    with pytest.raises(DoorError) as err:
        model_of(b"[" * 100000, "application/json")
    assert err.value.status == 400 and err.value.code == "invalid_json"


# -- idle release ----------------------------------------------------------------------------
async def test_an_idle_release_is_refused_when_a_request_came_and_went_meanwhile() -> None:
    """The release is decided at a tick, and runs when the operation gets the lock: a request
    served in between makes the service not idle any more (README: refused `not_idle`)."""
    door = _door({"a": (S.READY, {"idle": {"after_s": 10}})})
    door.idle = IdleWatch(door)
    gate = door.gate("a")
    now = time.monotonic()
    gate.last_active = now - 60
    door.idle.state["a"] = IdleState(busy_at=now - 60, util_pct=0, source="process",
                                      releasing=True)
    # a request comes and goes while the release waits for the lock
    gate.take(None).release()
    with pytest.raises(OperationError) as err:
        async with door.hold_back("a", IdleSleep("a")):
            pass
    assert err.value.code == "not_idle"
    assert gate.holds == 0
    # still idle by then: released
    gate.last_active = time.monotonic() - 60
    async with door.hold_back("a", IdleSleep("a")) as notes:
        assert notes == []


# -- turn-taking -----------------------------------------------------------------------------
async def test_when_the_requests_an_equal_yielded_to_are_gone_it_admits_again() -> None:
    """a's start waits for b's request in flight, so b admits none meanwhile. When a's
    requests give up, b's waiters are let in at once: not after b's long request ends, and
    a's stale entry does not keep the next request for a from planning."""
    refusal = Refusal(RequestStart("a"), "insufficient_vram", "no room", (
        Blocker("b", 14000, "priority 10 >= 10, requests in flight"),), 10000)
    orch = _Orch(refusal)
    door = _door({"a": (S.STOPPED, {"queue": {"timeout_s": 0.3}}),
                  "b": (S.READY, {"max_concurrent": 4, "queue": {"timeout_s": 5}})}, orch)
    long = door.gate("b").take(None)  # b's long request in flight
    a_cfg, b_cfg = door.serve_of("a"), door.serve_of("b")
    assert a_cfg is not None and b_cfg is not None
    a_wait = asyncio.create_task(door.admit("a", a_cfg))
    await until(lambda: door._waiting_on == {"a": frozenset({"b"})})
    b_wait = asyncio.create_task(door.admit("b", b_cfg))
    await until(lambda: door.gate("b").waiting == 1)  # queued, not let in
    assert not b_wait.done()  # b yields to a: turns are taken
    with pytest.raises(DoorError):
        await a_wait  # a's request gives up (its queue time)
    t0 = time.monotonic()
    slot = await asyncio.wait_for(b_wait, 2.0)
    assert time.monotonic() - t0 < 0.5
    slot.release()
    assert "a" not in door._waiting_on
    long.release()


async def test_a_start_does_not_wait_for_requests_that_cannot_make_room() -> None:
    """A refusal that names an equal with requests in flight (14000 MB) and a higher
    priority (20000 MB short after all): waiting for the equal frees too little. Its
    requests are answered the refusal at once, and the equal does not yield for nothing."""
    refusal = Refusal(RequestStart("a"), "insufficient_vram", "no room", (
        Blocker("h", 20000, "priority 50 >= 10"),
        Blocker("b", 14000, "priority 10 >= 10, requests in flight")), 30000)
    orch = _Orch(refusal)
    door = _door({"a": (S.STOPPED, {"queue": {"timeout_s": 5}}),
                  "b": (S.READY, {})}, orch)
    long = door.gate("b").take(None)
    a_cfg = door.serve_of("a")
    assert a_cfg is not None
    with pytest.raises(DoorError) as err:
        await asyncio.wait_for(door.admit("a", a_cfg), 2.0)
    assert err.value.status == 503 and err.value.code == "insufficient_vram"
    assert not door._waiting_on and orch.submitted == ["a"]
    long.release()


async def test_an_equal_that_took_requests_after_its_swap_was_planned_is_not_cut() -> None:
    """a's start swaps out b, idle when planned; b let a request in before its release step.
    The swap gives way (refused `swap_busy`, nothing released, the request not cut); a's
    start waits for b's request, b admits no new one meanwhile, and a tries again when b's
    request has ended."""
    swap = Plan(RequestStart("a"), (Step("sleep", "b", 13700, "swapped out", True),
                                    Step("wake", "a", 13700, "requested", after=(0,))),
                23552, 14000, 14000)
    loop = asyncio.get_running_loop()
    orch = _Orch(swap, op=loop.create_future())
    door = _door({"a": (S.SLEEPING, {}), "b": (S.READY, {})}, orch)
    a_cfg, b_cfg = door.serve_of("a"), door.serve_of("b")
    assert a_cfg is not None and b_cfg is not None
    a_wait = asyncio.create_task(door.admit("a", a_cfg))
    await until(lambda: orch.submitted == ["a"])  # the swap runs
    slot = await asyncio.wait_for(door.admit("b", b_cfg), 1.0)  # b is still ready: admitted
    # the swap's release step of b, as the executor runs it: it gives way
    with pytest.raises(OperationError) as err:
        async with door.hold_back("b", RequestStart("a")):
            pass
    assert err.value.code == "swap_busy" and slot.cut_reason is None
    assert door.gate("b").holds == 0
    assert orch.op is not None
    orch.op.set_exception(err.value)  # the operation ends refused
    await until(lambda: door._waiting_on == {"a": frozenset({"b"})})
    assert not a_wait.done()
    late = asyncio.create_task(door.admit("b", b_cfg))  # b yields to a's turn now
    await until(lambda: door.gate("b").waiting == 1)  # queued, not let in
    assert not late.done()
    orch.op = None  # the next try: (here) refused again, which answers a's waiter
    slot.release()  # b's request ends: a tries again
    with pytest.raises(DoorError):
        await asyncio.wait_for(a_wait, 1.0)
    assert orch.submitted == ["a", "a"]
    (await asyncio.wait_for(late, 1.0)).release()  # b admits again once a's turn is over


def test_the_status_never_shows_the_upstream_url_credentials() -> None:
    door = _door({"a": (S.READY, {})})
    served = door.daemon.inventory.services["a"]
    setattr(served, "serve", ServeConfig.model_validate(  # noqa: B010 (a read-only property)
        {"url": "http://user:s3cret@127.0.0.1:9"}))
    status = door.serve_status("a")
    assert status is not None and "s3cret" not in str(status)
