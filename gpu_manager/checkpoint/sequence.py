"""The checkpoint and restore sequences, over any driver that has the five per-pid calls.

The real driver (libcuda.py) and the simulated one (simulated.py) differ only in how one call on
one pid is made; the order of calls, the deadlines, the rollback of a partial checkpoint and
the report of where each pid is left are the same code, so the simulated tests exercise what
runs against the real driver.

Each driver call runs in its own daemon thread, not in asyncio's default executor: a driver
call that never returns (the stuck restore the driver documents) would otherwise hold an
executor thread that the interpreter joins at exit, and the daemon could never stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from loguru import logger

from gpu_manager.aio import retrieve, within
from gpu_manager.checkpoint.base import (
    CUDA_ERROR_NOT_READY,
    CUDA_SUCCESS,
    DRIVER_STATES,
    Call,
    Capability,
    Driver,
    PidOutcome,
    ProcessState,
    Result,
    alive,
    state_code,
)

T = TypeVar("T")
UNEXPECTED = 999  # CUDA_ERROR_UNKNOWN: a driver binding raised instead of answering
NO_STATE = "the state was not read by the deadline"
S = ProcessState


@dataclass(frozen=True, slots=True)
class _Late:
    """A call that did not answer in time; `started`: it is still running in its thread."""

    started: bool


@dataclass
class _Pid:
    """What one sequence knows of one pid while it runs."""

    pid: int
    state: ProcessState | None = None  # None: changed in a way we must read back
    ok: bool = True
    locked: bool = False  # locked by this sequence
    attempted: bool = False  # this sequence called checkpoint on it
    failed_call: Call | None = None
    error: str | None = None
    code: int | None = None
    timed_out: bool = False
    rolled_back: bool = False
    unchanged: bool = False
    stuck: bool = False  # a call of ours is still running: nothing more may be asked of it

    def fail(self, call: Call | None, error: str, code: int | None = None,
             timed_out: bool = False) -> None:
        """Record a failure; `call` None: refused or undone without a call of its own failing.
        A later failure (during a rollback) adds to the first, never hides it."""
        self.ok = False
        if self.failed_call is None and call is not None:
            self.failed_call, self.code = call, code
        prefix = f"{call}: " if call is not None and self.error is not None else ""
        self.error = error if self.error is None else f"{self.error}; {prefix}{error}"
        self.timed_out = self.timed_out or timed_out

    def outcome(self, ok: bool) -> PidOutcome:
        return PidOutcome(self.pid, ok and self.ok, self.state or S.UNKNOWN, self.failed_call,
                          self.error, self.code, self.timed_out, self.rolled_back,
                          self.unchanged)


class DriverCheckpointer:
    """A `Checkpointer` over a `Driver`; `open_driver` loads it (blocking: it runs in a
    thread) and says whether it is capable (the driver only when it is)."""

    def __init__(self, open_driver: Callable[[], tuple[Driver | None, Capability]]) -> None:
        self._open = open_driver
        self._driver: Driver | None = None
        self._capability: Capability | None = None
        self._opening: asyncio.Future[tuple[Driver | None, Capability]] | None = None
        self._guard = threading.Lock()  # the threads end calls while the loop reads these
        self._inflight: dict[int, str] = {}  # pid -> a driver call still running on it
        self._claimed: set[int] = set()  # pids a sequence of ours is working on

    # -- threads -----------------------------------------------------------------------------
    def _start(self, pid: int | None, call: str, fn: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        fut.add_done_callback(retrieve)

        def deliver(value: T | None, exc: BaseException | None) -> None:
            if fut.done():
                return  # its waiter gave up at the deadline
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)  # type: ignore[arg-type]

        def run() -> None:
            value: T | None = None
            exc: BaseException | None = None
            try:
                value = fn()
            except Exception as e:
                exc = e
            finally:
                if pid is not None:
                    with self._guard:
                        self._inflight.pop(pid, None)
            # RuntimeError: the loop closed meanwhile, and nobody waits for this answer
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, value, exc)

        if pid is not None:
            with self._guard:
                self._inflight[pid] = call
        threading.Thread(target=run, name=f"cuda-{call}", daemon=True).start()
        return fut

    async def _call(self, pid: int, call: Call, fn: Callable[[], int],
                    deadline: float) -> int | _Late:
        left = deadline - time.monotonic()
        if left <= 0:
            return _Late(started=False)
        fut = self._start(pid if call != "state" else None, call, fn)
        try:
            return await within(asyncio.shield(fut), left)
        except TimeoutError:
            logger.warning(f"checkpoint: {call} of pid {pid} did not answer within {left:.1f} s")
            return _Late(started=True)
        except Exception as exc:
            logger.opt(exception=exc).error(f"checkpoint: {call} of pid {pid} raised {exc!r}")
            return UNEXPECTED

    # -- the interface -----------------------------------------------------------------------
    async def capability(self, timeout_s: float = 10.0) -> Capability:
        if self._capability is not None:
            return self._capability
        if self._opening is None:  # one load at a time, shared by every waiter
            self._opening = self._start(None, "open", self._open)
        try:
            driver, cap = await within(asyncio.shield(self._opening), timeout_s)
        except TimeoutError:
            # the load goes on in its thread; a later call waits for the same one
            return Capability(False, None, None, False,
                              f"the CUDA driver did not load within {timeout_s:g} s")
        except Exception as exc:
            self._opening = None
            return Capability(False, None, None, False, f"loading the CUDA driver failed: {exc}")
        self._driver, self._capability = driver, cap
        return cap

    async def state(self, pid: int, timeout_s: float = 5.0) -> ProcessState:
        if await self._usable(timeout_s) is not None:
            return S.UNKNOWN
        state, _ = await self._read(pid, time.monotonic() + timeout_s)
        return state

    async def checkpoint(self, pids: Sequence[int], timeout_s: float, *,
                         cleanup_s: float | None = None) -> Result:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        work = [_Pid(p) for p in dict.fromkeys(pids)]
        cleanup = timeout_s if cleanup_s is None else cleanup_s
        ok = await self._guarded(work, timeout_s, cleanup,
                                 lambda: self._checkpoint_all(work, deadline, cleanup))
        return Result("checkpoint", tuple(w.outcome(ok) for w in work), time.monotonic() - t0)

    async def restore(self, pids: Sequence[int], timeout_s: float, *,
                      cleanup_s: float | None = None) -> Result:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        work = [_Pid(p) for p in dict.fromkeys(pids)]
        cleanup = timeout_s if cleanup_s is None else cleanup_s
        await self._guarded(work, timeout_s, cleanup,
                            lambda: self._restore_all(work, deadline, cleanup))
        return Result("restore", tuple(w.outcome(True) for w in work), time.monotonic() - t0)

    # -- the sequences -----------------------------------------------------------------------
    async def _guarded(self, work: list[_Pid], timeout_s: float, cleanup_s: float,
                       body: Callable[[], Coroutine[Any, Any, bool]]) -> bool:
        """Refuse everything when not capable or when a pid is busy, else run `body` with
        the pids claimed; True when `body` reports success."""
        why = await self._usable(timeout_s)
        if why is not None:
            for w in work:
                w.fail(None, f"not capable: {why}")
                w.state = S.UNKNOWN
            return False
        with self._guard:
            busy = {w.pid: self._inflight.get(w.pid, "a checkpoint or restore")
                    for w in work if w.pid in self._inflight or w.pid in self._claimed}
            if not busy:
                self._claimed.update(w.pid for w in work)
        if busy:
            for w in work:
                if w.pid in busy:
                    w.stuck = True  # its state is being changed by someone else: not read
                    w.fail(None, f"busy: {busy[w.pid]} of this pid is still running")
                else:
                    w.fail(None, f"not attempted: pid(s) {sorted(busy)} busy")
            await self._settle(work, time.monotonic() + cleanup_s)
            return False
        try:
            return await body()
        finally:
            with self._guard:
                self._claimed.difference_update(w.pid for w in work)

    async def _checkpoint_all(self, work: list[_Pid], deadline: float, cleanup_s: float) -> bool:
        failed = await self._lock_all(work, deadline)
        failed = failed or await self._park_all(work, deadline)
        if failed:
            await self._rollback(work, failed, time.monotonic() + cleanup_s)
        await self._settle(work, time.monotonic() + cleanup_s)
        return failed is None

    async def _lock_all(self, work: list[_Pid], deadline: float) -> _Pid | None:
        """Lock each pid found RUNNING; the first failure is returned."""
        driver = self._driver
        assert driver is not None
        for w in work:
            w.state, err = await self._read(w.pid, deadline)
            if w.state is S.CHECKPOINTED:
                w.unchanged = True
                continue
            if w.state is S.LOCKED:
                continue  # locked by someone else: checkpointed, and left LOCKED on a rollback
            if w.state is not S.RUNNING:
                w.fail("state", err or f"the process is {w.state.value}, not running",
                       timed_out=err == NO_STATE)
                return w
            left = deadline - time.monotonic()
            # The driver's own lock timeout ends a little before ours: a lock that waits too
            # long for the process's work then comes back as NOT_READY with the process still
            # RUNNING (documented), a clean outcome, rather than as a call we stop waiting for.
            lock_ms = max(1, int((left - min(0.5, left / 5)) * 1000))
            code = await self._call(w.pid, "lock", partial(driver.lock, w.pid, lock_ms),
                                    deadline)
            if not self._answered(w, "lock", code):
                return w
            w.locked, w.state = True, S.LOCKED
        return None

    async def _park_all(self, work: list[_Pid], deadline: float) -> _Pid | None:
        driver = self._driver
        assert driver is not None
        for w in work:
            if w.unchanged:
                continue
            w.attempted = True
            code = await self._call(w.pid, "checkpoint", partial(driver.checkpoint, w.pid),
                                    deadline)
            if not self._answered(w, "checkpoint", code):
                return w
            w.state = S.CHECKPOINTED
        return None

    async def _rollback(self, work: list[_Pid], failed: _Pid, deadline: float) -> None:
        """Put back, newest first, what this sequence changed: restore what it checkpointed,
        unlock what it locked. A pid found LOCKED is returned to LOCKED."""
        driver = self._driver
        assert driver is not None
        for w in work:
            if w is not failed and w.ok:
                done = "undone" if w.locked or w.attempted else "not attempted"
                w.fail(None, f"{done}: pid {failed.pid} failed ({failed.error})")
        for w in reversed(work):
            if w.stuck:
                continue
            if w.state is None:
                w.state, _ = await self._read(w.pid, deadline)
            if w.attempted and w.state is S.CHECKPOINTED:
                code = await self._call(w.pid, "restore", partial(driver.restore, w.pid),
                                        deadline)
                if not self._answered(w, "restore", code):
                    continue
                w.state, w.rolled_back = S.LOCKED, True
            if w.locked and w.state is S.LOCKED:
                code = await self._call(w.pid, "unlock", partial(driver.unlock, w.pid),
                                        deadline)
                if self._answered(w, "unlock", code):
                    w.state = S.RUNNING

    async def _restore_all(self, work: list[_Pid], deadline: float, cleanup_s: float) -> bool:
        driver = self._driver
        assert driver is not None
        for w in work:
            w.state, err = await self._read(w.pid, deadline)
            if w.state is S.RUNNING:
                w.unchanged = True
                continue
            if w.state is S.CHECKPOINTED:
                code = await self._call(w.pid, "restore", partial(driver.restore, w.pid),
                                        deadline)
                if not self._answered(w, "restore", code):
                    continue  # never retried: the caller decides, knowing the state
                w.state = S.LOCKED
            if w.state is S.LOCKED:
                code = await self._call(w.pid, "unlock", partial(driver.unlock, w.pid),
                                        deadline)
                if self._answered(w, "unlock", code):
                    w.state = S.RUNNING
                continue
            w.fail("state", err or f"the process is {w.state.value}: nothing to restore",
                   timed_out=err == NO_STATE)
        await self._settle(work, time.monotonic() + cleanup_s)
        return all(w.ok for w in work)

    # -- helpers -----------------------------------------------------------------------------
    def _answered(self, w: _Pid, call: Call, code: int | _Late) -> bool:
        """True when `call` succeeded; else records the failure on `w` (its state is then to
        be read back, or UNKNOWN while the call still runs)."""
        if isinstance(code, _Late):
            if code.started:
                w.stuck, w.state = True, S.UNKNOWN
                w.fail(call, "no answer by the deadline (the call still runs; the pid is "
                             "refused until it returns)", timed_out=True)
            else:
                w.fail(call, "the deadline passed before this call", timed_out=True)
            return False
        if code == CUDA_SUCCESS:
            return True
        assert self._driver is not None
        w.fail(call, f"{self._driver.error_name(code)} ({code})", code,
               timed_out=call == "lock" and code == CUDA_ERROR_NOT_READY)
        w.state = None  # read back: the driver says where a failed call leaves a process
        return False

    async def _settle(self, work: list[_Pid], deadline: float) -> None:
        """Read the state of every pid a failure left in doubt."""
        for w in work:
            if w.state is None:
                w.state = S.UNKNOWN if w.stuck else (await self._read(w.pid, deadline))[0]

    async def _read(self, pid: int, deadline: float) -> tuple[ProcessState, str | None]:
        """The driver's state of `pid`, and the error when it could not be read."""
        driver = self._driver
        if not alive(pid):
            return S.GONE, "no such process"
        if driver is None:
            return S.UNKNOWN, "no driver"
        answer = await self._call(pid, "state", partial(state_code, driver, pid), deadline)
        if isinstance(answer, _Late):
            return S.UNKNOWN, NO_STATE
        if answer >= 0:
            return DRIVER_STATES.get(answer, S.UNKNOWN), None
        code = -answer
        if not alive(pid):  # it died meanwhile: that is why the driver did not know it
            return S.GONE, "no such process"
        return S.UNKNOWN, f"{driver.error_name(code)} ({code})"

    async def _usable(self, timeout_s: float) -> str | None:
        cap = await self.capability(timeout_s)
        return None if cap.capable else cap.reason or "not capable"
