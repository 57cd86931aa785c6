"""Operations: one per mutating request, with its plan, its steps' timings and its outcome."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from gpu_manager.planner import (
    IdleSleep,
    IdleStop,
    Plan,
    PreparePhase,
    Prewarm,
    Refusal,
    Request,
    RequestStart,
    SleepService,
    StartService,
    StopAll,
    StopService,
)
from gpu_manager.planner.serialize import blocker_dict, request_dict

OpStatus = Literal["queued", "running", "succeeded", "failed", "refused", "interrupted"]


class OperationError(Exception):
    """A transition that did not complete; `code` maps to the HTTP status."""

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.extra = extra


def refusal_error(result: Refusal) -> OperationError:
    extra = {} if result.code != "insufficient_vram" else {
        "short_mb": result.short_mb,
        "blockers": [blocker_dict(b) for b in result.blockers]}
    return OperationError(result.code, result.message, **extra)


@dataclass
class StepRecord:
    action: str
    service: str
    mb: int
    reason: str
    preemption: bool
    status: str = "pending"  # pending, running, done, failed, skipped
    started_at: float | None = None
    duration_s: float | None = None
    # For starts: how long we waited for VRAM to come back before launching.
    reclaim_wait_s: float | None = None
    detail: str | None = None
    # The steps (indices) this one waited for; pending, running, done, failed or skipped.
    after: list[int] = field(default_factory=list)
    devices: list[int] = field(default_factory=list)  # the cards it acts on (several GPUs)
    how: str = ""  # a sleep by its ladder's checkpoint: "checkpoint"


@dataclass
class Operation:
    request: Request
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: OpStatus = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    budget_mb: int | None = None
    used_before_mb: int | None = None
    used_after_mb: int | None = None
    steps: list[StepRecord] = field(default_factory=list)
    error: dict[str, Any] | None = None
    dry_run: bool = False
    # The plan's overall deadline: the sum of its steps' own deadlines.
    deadline_s: float | None = None
    # Why it was cancelled, when whoever cancelled it knew: (code, detail), e.g. a prewarm
    # that gave way to a real request, an acquire whose timeout passed.
    cancelled_because: tuple[str, str] | None = None
    # Identical requests that joined it (their answer is its answer).
    joined: int = 0

    @property
    def done(self) -> bool:
        return self.status not in ("queued", "running")

    @property
    def label(self) -> str:
        req = request_dict(self.request)
        target = req.get("name", req.get("phase"))
        if target is None and req.get("services"):
            target = ",".join(req["services"])
        return (f"{req['kind']}:{target}:{self.id}" if target not in ("", None)
                else f"{req['kind']}:{self.id}")

    def set_plan(self, plan: Plan) -> None:
        self.budget_mb = plan.budget_mb
        self.used_before_mb = plan.used_before_mb
        self.used_after_mb = plan.used_after_mb
        self.steps = [StepRecord(s.action, s.service, s.mb, s.reason, s.preemption,
                                 after=list(s.after), devices=list(s.devices), how=s.how)
                      for s in plan.steps]

    def finish(self, status: OpStatus, error: dict[str, Any] | None = None) -> None:
        self.status = status
        self.error = error
        self.finished_at = time.time()

    def as_dict(self) -> dict[str, Any]:
        total = (self.finished_at - self.started_at
                 if self.finished_at is not None and self.started_at is not None else None)
        return {
            "id": self.id, "request": request_dict(self.request), "status": self.status,
            "dry_run": self.dry_run, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "duration_s": total, "deadline_s": self.deadline_s, "budget_mb": self.budget_mb,
            "used_before_mb": self.used_before_mb, "used_after_mb": self.used_after_mb,
            "steps": [vars(s) for s in self.steps], "error": self.error,
        }


def interrupted(data: dict[str, Any]) -> Operation:
    """An operation a previous daemon had in flight when it died, as the record left it."""
    req = data.get("request") or {}
    kinds: dict[str, Any] = {
        "PreparePhase": lambda: PreparePhase(int(req["phase"])),
        "StartService": lambda: StartService(str(req["name"])),
        "RequestStart": lambda: RequestStart(str(req["name"])),
        "IdleSleep": lambda: IdleSleep(str(req["name"]), bool(req.get("force"))),
        "IdleStop": lambda: IdleStop(str(req["name"]), bool(req.get("force"))),
        "StopService": lambda: StopService(str(req["name"]), bool(req.get("force"))),
        "StopAll": StopAll,
        "SleepService": lambda: SleepService(str(req["name"]), bool(req.get("force"))),
        "Prewarm": lambda: Prewarm(req.get("phase"), tuple(req.get("services") or ())),
    }
    op = Operation(kinds.get(str(req.get("kind")), StopAll)(), id=str(data.get("id")))
    op.created_at = float(data.get("created_at") or time.time())
    op.started_at = data.get("started_at")
    op.steps = [StepRecord(**{k: v for k, v in s.items() if k in StepRecord.__dataclass_fields__})
                for s in data.get("steps") or []]
    op.finish("interrupted", {
        "error": "interrupted",
        "detail": "the daemon stopped (crash or kill) during this operation; at restart the "
                  "GPU state was rebuilt from the processes and containers found running"})
    return op


class OperationLog:
    """The last `keep` operations, by id; an operation still in flight is never dropped.

    Eviction takes the oldest *finished* operations: a client polling the operation it queued
    with `wait=false` must find it until it is done. When everything kept is in flight the log
    grows past `keep`; the API's cap on pending operations bounds how far.
    """

    def __init__(self, keep: int = 200) -> None:
        self._ops: OrderedDict[str, Operation] = OrderedDict()
        self._keep = keep

    def add(self, op: Operation) -> Operation:
        self._ops[op.id] = op
        self._evict()
        return op

    def _evict(self) -> None:
        excess = len(self._ops) - self._keep
        if excess <= 0:
            return
        # Oldest first; in-flight ones are skipped, not counted.
        for op_id in [i for i, o in self._ops.items() if o.done][:excess]:
            del self._ops[op_id]

    def __len__(self) -> int:
        return len(self._ops)

    def get(self, op_id: str) -> Operation | None:
        return self._ops.get(op_id)

    def recent(self, limit: int) -> list[Operation]:
        return list(self._ops.values())[-limit:]

    def in_flight(self) -> list[Operation]:
        return [op for op in self._ops.values() if not op.done]
