"""The front door: requests for a served service start it, wake it, or wait their turn.

A request is admitted when its service is ready, nothing holds it back (a release draining
it) and fewer than `max_concurrent` requests are in flight; otherwise it waits in the
service's queue (at most `queue.max`, for at most `queue.timeout_s`). A stopped or sleeping
service is started through the planner as a `RequestStart` operation, one per service at a
time however many requests wait (they all join it). A start that is refused or fails answers
every request that was waiting for it, with the blockers and the MB short.

One owner per piece of state: the gates are written by the request handlers and the releases
they hold back (all on the event loop); the start tasks by `_ensure_start`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Literal

import httpx
from loguru import logger

from gpu_manager.config.serve import ServeConfig
from gpu_manager.frontdoor.errors import DoorError
from gpu_manager.frontdoor.gate import Gate, Slot
from gpu_manager.frontdoor.refusals import in_flight, mb_of, start_error
from gpu_manager.frontdoor.stats import DoorStats
from gpu_manager.lock import LockHeld, LockLost, LockUnavailable
from gpu_manager.orchestrator import OperationError
from gpu_manager.planner import (
    IdleSleep,
    IdleStop,
    Refusal,
    Request,
    RequestStart,
    StopService,
)
from gpu_manager.redact import redact_url
from gpu_manager.units import Event, ServiceState

if TYPE_CHECKING:
    from gpu_manager.frontdoor.host import Host
    from gpu_manager.frontdoor.idle import IdleWatch

S = ServiceState
# Retry-After (s): a full queue drains.
RETRY_QUEUE_S = 2.0
STARTABLE = frozenset({S.STOPPED, S.SLEEPING, S.FAILED})


class FrontDoor:
    def __init__(self, daemon: Host, stats: DoorStats) -> None:
        self.daemon = daemon
        self.stats = stats
        self.gates: dict[str, Gate] = {}
        self._starts: dict[str, asyncio.Task[None]] = {}
        # service -> (when, why): the last start a request caused that did not succeed; the
        # requests that were waiting by then are answered with it.
        self._failed: dict[str, tuple[float, DoorError]] = {}
        # service -> the services with requests in flight that its start waits for (an
        # equal in priority may swap them out only once they are idle). Until that start
        # has run, they admit no new request: turns are taken, nobody is starved.
        self._waiting_on: dict[str, frozenset[str]] = {}
        self._models: tuple[object, dict[str, str]] = (None, {})
        self.idle: IdleWatch | None = None  # set by install()
        self._shutdown: asyncio.TimerHandle | None = None
        # One pooled client for every upstream: keep-alive connections, no retries (a
        # request is not idempotent), deadlines per request from the service's `serve:`.
        self.client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256,
                                keepalive_expiry=30.0),
            timeout=httpx.Timeout(30.0), follow_redirects=False, trust_env=False)

    # -- the inventory, read live (a reload swaps it) -----------------------------------------
    def serve_of(self, name: str) -> ServeConfig | None:
        cfg = self.daemon.inventory.services.get(name)
        return None if cfg is None else cfg.serve

    def served(self) -> dict[str, ServeConfig]:
        return {n: c.serve for n, c in self.daemon.inventory.services.items()
                if c.serve is not None}

    def models(self) -> dict[str, str]:
        """Model name -> service, rebuilt when the inventory changes."""
        inv = self.daemon.inventory
        if self._models[0] is not inv:
            self._models = (inv, {m: n for n, c in self.served().items() for m in c.models})
        return self._models[1]

    def gate(self, name: str) -> Gate:
        gate = self.gates.get(name)
        if gate is None:
            gate = self.gates[name] = Gate(name, self._gate_free,
                                           self.daemon.status_cache.invalidate)
        return gate

    def _gate_free(self, name: str) -> None:
        """`name` has no request in flight any more: the starts that waited for it (an
        equal may swap it out now) are tried again."""
        for other, busy in list(self._waiting_on.items()):
            if name in busy:
                self.gate(other).notify()

    def _unwanted(self, name: str) -> None:
        """No request waits for `name` any more and no start of it runs: its start waits for
        nobody, and those it waited for admit again now (not when their requests end)."""
        gate = self.gates.get(name)
        if (gate is None or not gate.waiting) and name not in self._starts:
            self._set_waiting(name, None)

    def _yielding(self, name: str) -> bool:
        """Whether `name` admits no new request: the start of an equal with requests
        waiting for it waits for `name`'s requests in flight to end."""
        return any(name in busy and (g := self.gates.get(other)) is not None and g.waiting
                   for other, busy in self._waiting_on.items())

    # -- life ----------------------------------------------------------------------------------
    def attach(self) -> None:
        """Hook into the daemon: releases drain through us, unit changes wake our waiters."""
        self.daemon.orchestrator.drainer = self
        self.daemon.bus.on(self._on_event)

    def _on_event(self, event: Event) -> None:
        if event.kind == "state" and event.service in self.gates:
            self.gates[event.service].notify()

    def shutting_down(self, deadline: float) -> None:
        """SIGTERM: the requests waiting are answered 503 now (they look again when woken);
        those in flight may finish until `deadline` (monotonic), then `aclose` cuts them."""
        for gate in self.gates.values():
            gate.notify()
        self._shutdown = asyncio.get_running_loop().call_at(deadline, self._cut_all)

    def _cut_all(self) -> None:
        for gate in self.gates.values():
            for slot in list(gate.in_flight):
                slot.cut("the daemon is stopping")

    async def aclose(self) -> None:
        if self._shutdown is not None:
            self._shutdown.cancel()
        for task in list(self._starts.values()):
            task.cancel()
        self._cut_all()
        for gate in self.gates.values():
            gate.notify()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self.client.aclose()

    # -- admission -----------------------------------------------------------------------------
    async def admit(self, name: str, cfg: ServeConfig) -> Slot:
        """A slot for one request to `name`, once it is ready and has room. Raises DoorError:
        429 when the queue is full, 503 when its wait ends without a slot."""
        gate = self.gate(name)
        task = asyncio.current_task()
        unit = self.daemon.units.get(name)
        if unit is not None and unit.state is S.READY and gate.has_room(cfg.max_concurrent) \
                and not gate.waiting and self.daemon.accepting and not (
                    self._waiting_on and self._yielding(name)):
            return gate.take(task)  # the hot path: no queue, no clock
        if not self.daemon.accepting:
            raise DoorError(503, "shutting_down", "the daemon is stopping", retry_after=5)
        if gate.waiting >= cfg.queue.max:
            raise DoorError(429, "queue_full", f"{gate.waiting} requests already wait for "
                            f"{name} (serve.queue.max {cfg.queue.max})",
                            retry_after=RETRY_QUEUE_S)
        t0 = time.monotonic()
        deadline = t0 + cfg.queue.timeout_s
        cold = False
        gate.waiting += 1
        gate.changed_figures()
        try:
            while True:
                unit = self.daemon.units.get(name)
                if unit is None or self.serve_of(name) is None:
                    raise DoorError(404, "unknown_service", f"{name} is no longer served")
                if unit.state is S.READY and gate.has_room(cfg.max_concurrent) \
                        and not self._yielding(name):
                    waited = time.monotonic() - t0
                    self.stats.queued(name, waited, cold)
                    return gate.take(task)
                failed = self._failed.get(name)
                if failed is not None and failed[0] >= t0:
                    raise failed[1]
                if not self.daemon.accepting:
                    raise DoorError(503, "shutting_down", "the daemon is stopping",
                                    retry_after=5)
                # waiting for an equal's requests in flight: not before they end (the entry
                # stays until the start has run, so the equal admits none meanwhile)
                waits = self._waiting_on.get(name)
                if unit.state in STARTABLE and gate.holds == 0 \
                        and not (waits and waits & self.in_use()):
                    cold = True
                    self._ensure_start(name)
                elif unit.state in (S.STARTING, S.WAKING):
                    cold = True
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DoorError(
                        503, "queue_timeout", f"{name} was not ready with a free slot within "
                        f"{cfg.queue.timeout_s:g}s (serve.queue.timeout_s); it is "
                        f"{unit.state.value}", retry_after=RETRY_QUEUE_S,
                        state=unit.state.value)
                await gate.changed(left)
        finally:
            gate.waiting -= 1
            gate.changed_figures()
            self._unwanted(name)

    def _ensure_start(self, name: str) -> None:
        task = self._starts.get(name)
        if task is None or task.done():
            self._starts[name] = asyncio.create_task(self._start(name),
                                                     name=f"front-door-start-{name}")

    async def _start(self, name: str) -> None:
        """One start (or wake) for every request waiting on `name`; its failure is theirs."""
        gate = self.gate(name)
        try:
            # An equal with requests in flight when it was planned, idle by the time the
            # refusal came back: planned again (a few times), not answered as a refusal.
            for _ in range(3):
                outcome = await self._try_start(name, gate)
                if outcome == "wait":
                    return  # its entry in _waiting_on stays: tried again when they end
                if outcome == "done":
                    break
            self._set_waiting(name, None)
        except asyncio.CancelledError:
            self._set_waiting(name, None)
            raise
        except Exception as exc:
            self._set_waiting(name, None)
            self._failed[name] = (time.monotonic(), start_error(name, exc))
            if not isinstance(exc, OperationError | LockHeld | LockLost | LockUnavailable):
                logger.opt(exception=exc).error(f"front door: starting {name} failed: {exc}")
        finally:
            self._starts.pop(name, None)
            gate.notify()
            self._unwanted(name)

    def _set_waiting(self, name: str, busy: frozenset[str] | None) -> None:
        """What `name`'s start waits for (None: nothing); those no longer waited for admit
        again now."""
        before = self._waiting_on.pop(name, frozenset())
        if busy:
            self._waiting_on[name] = busy
        for other in before - (busy or frozenset()):
            self.gate(other).notify()

    async def _try_start(self, name: str, gate: Gate) -> Literal["done", "wait", "again"]:
        """Plan and run one start: done, or blocked by requests in flight (wait for them),
        or blocked by requests that ended meanwhile (again, now)."""
        orch = self.daemon.orchestrator
        request = RequestStart(name)
        # Looked at first, not submitted: a start that must wait for an equal's requests in
        # flight waits for them here, not as a refused operation per attempt.
        async with asyncio.timeout(self.daemon.bounds.pids_s + 1.0):
            ahead = await orch.dry_run(request)
        if isinstance(ahead, Refusal) and in_flight(
                ((b.reason, b.mb) for b in ahead.blockers), ahead.short_mb):
            return self._wait_for_busy(name, (b.name for b in ahead.blockers))
        op, task, joined = orch.submit(request)
        if not joined:
            gate.starts += 1
            self.stats.started(name)
        logger.info(f"front door: a request starts {name} (operation {op.id})")
        try:
            await asyncio.shield(task)  # our waiters may give up; the start goes on
        except OperationError as exc:
            if exc.code == "swap_busy":
                return self._wait_for_busy(name, (str(b) for b in exc.extra.get("busy") or ()))
            blockers = exc.extra.get("blockers") or ()
            if exc.code == "insufficient_vram" and in_flight(
                    ((str(b.get("reason")), mb_of(b.get("mb"))) for b in blockers),
                    mb_of(exc.extra.get("short_mb"))):
                return self._wait_for_busy(name, (str(b.get("name")) for b in blockers))
            raise
        return "done"

    def _wait_for_busy(self, name: str, blockers: Iterable[str]) -> Literal["wait", "again"]:
        """The start of `name` was blocked by services with requests in flight: wait for
        those still busy (they admit no new request meanwhile; tried again when they are
        idle, its requests waiting within their queue time), or go again if none is."""
        busy = frozenset(blockers) & self.in_use()
        if busy:
            self._set_waiting(name, busy)
            return "wait"
        return "again"

    def serve_status(self, name: str) -> dict[str, Any] | None:
        """A served service's front-door figures for `/gpu/status`; None when it is not served."""
        cfg = self.serve_of(name)
        if cfg is None:
            return None
        gate = self.gates.get(name)
        now = time.monotonic()
        idle: dict[str, Any] | None = None
        if cfg.idle is not None:
            st = self.idle.state.get(name) if self.idle is not None else None
            quiet = self.idle.idle_for(name, now) if self.idle is not None else None
            idle = {"after_s": cfg.idle.after_s, "below_util_pct": cfg.idle.below_util_pct,
                    "then": cfg.idle.then, "idle_for_s": None if quiet is None else round(quiet, 1),
                    "util_pct": st.util_pct if st else None,
                    "util_source": st.source if st else "none",
                    "releasing": bool(st and st.releasing)}
        return {
            "url": redact_url(cfg.url), "models": list(cfg.models),
            "max_concurrent": cfg.max_concurrent,
            "in_flight": len(gate.in_flight) if gate else 0,
            "waiting": gate.waiting if gate else 0, "queue_max": cfg.queue.max,
            "draining": bool(gate and gate.holds),
            "last_request_at": gate.last_request_at if gate else None,
            "request_starts": gate.starts if gate else 0,
            "cut": gate.cut if gate else 0,
            "idle": idle,
        }

    # -- the orchestrator's side: releases drain us first --------------------------------------
    def in_use(self) -> frozenset[str]:
        return frozenset(n for n, g in self.gates.items() if g.in_flight)


    def drain_bound_s(self, name: str) -> float:
        cfg = self.serve_of(name)
        return 0.0 if cfg is None else cfg.drain_s

    def _quiet(self, name: str) -> bool:
        """Still idle when its release runs: no request came and went, nor was it busy by
        measure, since the idle watch decided (the release may have waited for the lock)."""
        cfg = self.serve_of(name)
        quiet = None if self.idle is None else self.idle.idle_for(name, time.monotonic())
        return cfg is None or cfg.idle is None or quiet is None or quiet >= cfg.idle.after_s

    def _swap(self, name: str, request: Request) -> bool:
        """Whether `request` releases `name` to start an equal in priority (a request's swap:
        only an idle equal may be swapped out)."""
        if not isinstance(request, RequestStart):
            return False
        svcs = self.daemon.inventory.services
        mine, theirs = svcs.get(name), svcs.get(request.name)
        return mine is not None and theirs is not None and mine.priority == theirs.priority

    @contextlib.asynccontextmanager
    async def hold_back(self, name: str, request: Request) -> AsyncIterator[list[str]]:
        cfg = self.serve_of(name)
        if cfg is None:
            yield []
            return
        gate = self.gate(name)
        if isinstance(request, IdleSleep | IdleStop) and (gate.busy or not self._quiet(name)):
            raise OperationError("not_idle", f"{name} has requests again; not released")
        if gate.in_flight and self._swap(name, request):
            # planned while it was idle, it let requests in since: an equal may not cut them.
            # The swap gives way (nothing of it released yet); the start that asked waits for
            # them as for any equal busy when planned (_try_start), and this one yields.
            raise OperationError("swap_busy", f"{name} took requests since it was planned out "
                                 f"for {getattr(request, 'name', '?')}; the swap waits for them",
                                 busy=[name])
        gate.holds += 1  # new requests wait from now on
        gate.changed_figures()
        try:
            force = isinstance(request, StopService) and request.force
            had, cut = await gate.drain(0.0 if force else cfg.drain_s)
            notes = []
            if had:
                notes.append(f"drained {had - cut} request(s) in flight" + (
                    f", cut {cut} after {0.0 if force else cfg.drain_s:g}s" if cut else ""))
                self.stats.drained(name, had - cut, cut)
            yield notes
        finally:
            gate.holds -= 1
            gate.notify()
