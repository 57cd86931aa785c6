"""The owner-loop machinery every unit is built on: one inbox, one task that reads it, bounded
asks, guarded helper tasks, and state changes checked against the transition table.

`Unit` (units/unit.py) adds what the messages (units/messages.py) mean: start, stop, adopt,
reconfigure, sleep, and what the watchers report. This half knows nothing of services; it
makes sure that whatever a handler does, a caller gets an answer in bounded time, a message
whose caller gave up is not acted on later, and a unit never stays in a state that nothing
will move it out of.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from loguru import logger

from gpu_manager.aio import guarded, settle
from gpu_manager.bounds import DEFAULT, Bounds
from gpu_manager.config import ServiceConfig
from gpu_manager.units.drivers.base import Driver, DriverError, ExitInfo
from gpu_manager.units.events import Event, EventBus
from gpu_manager.units.health import HealthChecker
from gpu_manager.units.messages import (
    Adopt,
    Ask,
    Crashed,
    EnsureReady,
    Message,
    Reconfigure,
    Sleep,
    Stop,
    Woke,
)
from gpu_manager.units.restart import RestartPolicy, Restarts
from gpu_manager.units.result import UnitResult
from gpu_manager.units.sleeper import HttpSleeper, Sleeper
from gpu_manager.units.states import (
    HOLDS_GPU,
    RUNNING,
    TRANSIENT,
    InvalidTransition,
    ServiceState,
    allowed,
)

S = ServiceState
RecordSink = Callable[[str, dict[str, Any] | None], None]
RestartGate = Callable[[str], Awaitable[bool]]
# Waits (bounded) until every record made so far is on disk: an intent must be, before the
# call it announces (a daemon killed during a sleep call must find "sleep" in the record).
Flush = Callable[[], Awaitable[bool]]


def answer(fut: asyncio.Future[UnitResult], result: UnitResult) -> None:
    """Answer a caller, unless it gave up meanwhile (its bound passed: `_ask` cancelled it)."""
    if not fut.done():
        fut.set_result(result)


class UnitOwner:
    def __init__(
        self, name: str, cfg: ServiceConfig, driver: Driver, health: HealthChecker,
        bus: EventBus, *, on_record: RecordSink | None = None,
        restart_gate: RestartGate | None = None, policy: RestartPolicy | None = None,
        bounds: Bounds = DEFAULT, sleeper: Sleeper | None = None,
        flush: Flush | None = None,
    ) -> None:
        self.name = name
        self.bounds = bounds
        self.cfg = cfg
        self.driver = driver
        self._health = health
        self._bus = bus
        self._on_record = on_record
        self._restart_gate = restart_gate
        self.state = S.STOPPED
        self.reason = "not started"
        self.since = time.time()
        self.since_mono = time.monotonic()
        self.last_exit: ExitInfo | None = None
        self.health_detail: str | None = None
        self.health_failures = 0  # failed checks of a running service, for metrics
        self.faults = 0  # crashed helper tasks and handler errors, for /gpu/status
        self.restarts = Restarts(policy or RestartPolicy())
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._gen = 0  # bumps with every launch/adopt/stop, so stale watcher news is dropped
        self._waiters: list[asyncio.Future[UnitResult]] = []
        self._start_began = 0.0
        self._start_auto = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self.handling: str | None = None  # the message the owner loop is acting on now
        self._health_fails = 0
        self._next: tuple[ServiceConfig, Driver] | None = None  # reconfigure while running
        self.sleeper: Sleeper = sleeper or HttpSleeper()
        self._sleep_memo: tuple[str, ...] = ()  # what the wake needs of the sleep
        # asleep by its ladder's cuda-checkpoint (the wake restores), not its sleep API
        self._deep = False
        # A sleep or wake under way, in the record before its call: "sleep" or "wake".
        self._intent: str | None = None
        self._flush = flush
        self.sleeps = 0  # for metrics: sleeps the service confirmed, wakes that worked
        self.wakes = 0
        # Several GPUs: the cards it was placed on (indices) and how the driver names them to
        # the service (UUIDs); kept across restarts and daemon restarts (the record).
        self.devices: tuple[int, ...] = ()
        self.visible: tuple[str, ...] = ()

    # -- public API ---------------------------------------------------------------------------
    def place(self, devices: tuple[int, ...], visible: tuple[str, ...]) -> None:
        """Where its next launch runs: called by the executor before a start, never while
        anything of it runs (a running service is not moved)."""
        if self.driver.running():
            return
        self.devices, self.visible = devices, visible

    def start_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._run(), name=f"unit-{self.name}")

    @property
    def stop_bound_s(self) -> float:
        return self.cfg.stop_timeout_s + self.bounds.kill_grace_s

    @property
    def start_sequence_bound_s(self) -> float:
        """The start sequence's backstop: its own health deadline is start_timeout_s, and the
        last check may run its full timeout past that."""
        health = self.cfg.health
        margin = self.bounds.answer_margin_s
        return self.cfg.start_timeout_s + (health.timeout_s + margin if health else margin)

    @property
    def sleep_bound_s(self) -> float:
        sleep = self.cfg.sleep
        return (sleep.timeout_s if sleep else 0.0) + self.bounds.answer_margin_s

    @property
    def wake_bound_s(self) -> float:
        """The wake call, then the health check within the start timeout; a failed wake
        stops what it woke."""
        sleep = self.cfg.sleep
        return (sleep.wake_timeout_s if sleep else 0.0) + self.start_sequence_bound_s \
            + self.stop_bound_s

    @property
    def start_bound_s(self) -> float:
        # an unhealthy service is stopped first; a failed start stops what it launched
        return self.start_sequence_bound_s + 2 * self.stop_bound_s

    async def ensure_ready(self) -> UnitResult:
        # a start, or a wake (its call plus the health check) when it sleeps
        return await self._ask(max(self.start_bound_s, self.wake_bound_s),
                               EnsureReady)

    async def sleep(self, reason: str, requester: str = "gpu-manager",
                    deep: bool = False) -> UnitResult:
        """Ask the service to let its VRAM go (the `sleep:` block; `deep`: its ladder's
        cuda-checkpoint). ok: it said it did; the GPU's evidence is the caller's to check."""
        return await self._ask(self.sleep_bound_s + self.bounds.lock_io_s,
                               lambda f: Sleep(f, reason, requester, deep))

    async def woke(self, detail: str) -> UnitResult:
        """It holds its VRAM again on its own (a request reloaded the model)."""
        return await self._ask(self.bounds.unit_call_s, lambda f: Woke(f, detail))

    async def stop(self, reason: str = "requested") -> UnitResult:
        return await self._ask(self.stop_bound_s, lambda f: Stop(f, reason))

    async def adopt(self, record: dict[str, Any]) -> bool | None:
        """True: adopted; False: nothing of it runs; None: could not tell (keep the record)."""
        result = await self._ask(self.bounds.unit_call_s + self.sleep_bound_s,
                                 lambda f: Adopt(f, record))
        return None if result.unknown else result.ok

    async def reconfigure(self, cfg: ServiceConfig, driver: Driver) -> UnitResult:
        """Take a changed definition: now when nothing runs, else at the next launch."""
        return await self._ask(self.bounds.unit_call_s, lambda f: Reconfigure(f, cfg, driver))

    async def close(self) -> None:
        """Stop owning the service without stopping it (daemon shutdown / restart)."""
        tasks = [*self._tasks.values(), *([self._loop_task] if self._loop_task else [])]
        self._tasks.clear()
        self._loop_task = None
        await settle(tasks, 5.0)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value, "reason": self.reason, "since": self.since,
            "restarts": self.restarts.count, "health": self.health_detail,
            "last_exit": self.last_exit.describe() if self.last_exit else None,
            "faults": self.faults,
        }

    @property
    def holds_gpu(self) -> bool:
        """May hold VRAM: a state that says so, or a process that lives on although the unit
        gave up on it (a stop that failed): the planner must count it, and a stop must
        still reach it."""
        return self.state in HOLDS_GPU or self.driver.running()

    def overdue(self, now: float | None = None) -> bool:
        """In a transient state for longer than its deadline allows (an invariant breach)."""
        if self.state not in TRANSIENT:
            return False
        bound = {S.STARTING: self.start_bound_s, S.WAKING: self.wake_bound_s}.get(
            self.state, self.stop_bound_s)
        return (now or time.monotonic()) - self.since_mono > bound + self.bounds.answer_margin_s

    async def _ask(self, bound: float,
                   make: Callable[[asyncio.Future[UnitResult]], Message]) -> UnitResult:
        self.start_loop()
        fut: asyncio.Future[UnitResult] = asyncio.get_running_loop().create_future()
        msg = make(fut)
        assert isinstance(msg, Ask)
        kind = type(msg).__name__
        self._inbox.put_nowait(msg)
        try:
            async with asyncio.timeout(bound + self.bounds.answer_margin_s):
                return await asyncio.shield(fut)
        except TimeoutError:
            # The caller gives up: a message still in the inbox is dropped, not acted on
            # later for nobody (a stop long after its operation ended, say).
            fut.cancel()
            logger.error(f"{self.name}: no answer to {kind} within {bound:g}s "
                         f"(state {self.state.value}: {self.reason})")
            waited = bound + self.bounds.answer_margin_s
            return UnitResult(False, self.state, f"{self.name} did not answer {kind} within "
                              f"{waited:g}s (state {self.state.value})", waited, unknown=True)

    async def _handle(self, msg: Message) -> None:
        """Act on one message: the Unit's one `match` (units/unit.py)."""

    # -- the owner loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            msg = await self._inbox.get()
            if isinstance(msg, Ask) and msg.fut.done():
                continue  # its caller gave up before it was handled
            kind = self.handling = type(msg).__name__
            try:
                await self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the owner loop must outlive any single failure
                self.faults += 1
                logger.opt(exception=exc).error(f"{self.name}: error handling {kind}: {exc}")
                self._recover(f"internal error handling {kind}: {type(exc).__name__}: {exc}")
                if isinstance(msg, Ask):
                    answer(msg.fut, UnitResult(False, self.state, f"internal error: {exc}",
                                               0, unknown=True))
            finally:
                self.handling = None

    def _recover(self, why: str) -> None:
        """After a handler failed: never leave the unit in a state nothing will move it out of.
        A start whose sequence task still runs will finish on its own; anything else
        transient (or a start with no task left) becomes `failed`, with the reason."""
        starting_alive = self.state in (S.STARTING, S.WAKING) and self._alive("start")
        if self.state in TRANSIENT and not starting_alive:
            self._gen += 1
            self._cancel("start", "health", "exit")
            self._force(S.FAILED, why)
            self._record()
            self._finish_waiters(False, why)

    def _post(self, msg: Message) -> None:
        self._inbox.put_nowait(msg)

    def _set(self, state: ServiceState, reason: str) -> None:
        if not allowed(self.state, state):
            raise InvalidTransition(self.name, self.state, state)
        self._force(state, reason)

    def _force(self, state: ServiceState, reason: str) -> None:
        """Set a state without the table: only `_recover` uses it, to reach `failed`."""
        prev, self.state, self.reason = self.state, state, reason
        self._intent = None  # a sleep or wake under way ends with any change of state
        self.since, self.since_mono = time.time(), time.monotonic()
        self._bus.publish(Event("state", self.name, {
            "state": state.value, "previous": prev.value, "reason": reason,
        }))
        logger.bind(service=self.name, state=state.value, previous=prev.value,
                    reason=reason).info(f"{prev.value} -> {state.value} ({reason})")

    def _note(self, reason: str) -> None:
        """A new reason for the same state (e.g. a restart declined): an event, no change."""
        self.reason = reason
        self._bus.publish(Event("state", self.name, {
            "state": self.state.value, "previous": self.state.value, "reason": reason}))

    def _spawn(self, key: str, factory: Callable[[], Coroutine[Any, Any, None]],
               gen: int) -> None:
        old = self._tasks.pop(key, None)
        if old is not None:
            old.cancel()
        self._tasks[key] = asyncio.create_task(
            guarded(factory, f"{self.name}-{key}",
                    lambda exc: self._post(Crashed(key, gen, exc))),
            name=f"{self.name}-{key}")

    def _alive(self, key: str) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

    def _cancel(self, *keys: str) -> None:
        for key in keys:
            task = self._tasks.pop(key, None)
            if task is not None:
                task.cancel()

    def _record(self) -> None:
        if self._on_record is None:
            return
        record = self.driver.record() if self.state in RUNNING else None
        if record is not None and self.state == S.SLEEPING:
            # so a restarted daemon adopts it as asleep, and knows what to wake
            record = {**record, "asleep": True, "memo": list(self._sleep_memo),
                      **({"deep": True} if self._deep else {})}
        if record is not None and self._intent is not None:
            # a sleep or wake under way: a daemon that dies during its call asks the service
            # how it is (and the GPU what it holds) instead of trusting the state before it
            record = {**record, "intent": self._intent, "memo": list(self._sleep_memo),
                      **({"deep": True} if self._deep else {})}
        if record is not None and self.devices:
            record = {**record, "devices": list(self.devices), "visible": list(self.visible)}
        self._on_record(self.name, record)

    async def _announce(self, intent: str | None) -> None:
        """Record `intent` (or that none is under way) and, for an intent, wait (bounded)
        until it is on disk: the call it announces comes after."""
        self._intent = intent
        self._record()
        if intent is not None and self._flush is not None:
            try:
                async with asyncio.timeout(self.bounds.lock_io_s):
                    written = await self._flush()
            except TimeoutError:
                written = False
            if not written:
                logger.warning(f"{self.name}: the record of its {intent} is not yet on disk; "
                               "going on (a crash now is reconciled from the service)")

    def _finish_waiters(self, ok: bool, reason: str) -> None:
        result = UnitResult(ok, self.state, reason, time.monotonic() - self._start_began)
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(result)
        self._waiters.clear()

    async def _driver(self, what: str, aw: Awaitable[Any], timeout: float) -> Any:
        """A driver call under its deadline; expiry and any error become a DriverError."""
        try:
            async with asyncio.timeout(timeout):
                return await aw
        except TimeoutError as exc:
            raise DriverError(f"{what} did not finish within {timeout:g}s") from exc
        except DriverError:
            raise
        except Exception as exc:
            logger.opt(exception=exc).error(f"{self.name}: {what} raised {exc!r}")
            raise DriverError(f"{what} failed: {type(exc).__name__}: {exc}") from exc

    async def _stop_driver(self) -> ExitInfo:
        info: ExitInfo = await self._driver(f"stopping {self.name}",
                                  self.driver.stop(self.cfg.stop_timeout_s), self.stop_bound_s)
        return info
