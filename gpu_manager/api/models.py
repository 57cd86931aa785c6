"""The API's bodies as pydantic models: what `/docs` and the OpenAPI schema publish, so that
generated clients get types.

They describe the dicts the routes return; the routes do not serialize through them (a
response model would drop any field missing here, breaking callers, and cost /gpu/status
its speed). `tests/test_fuzz.py` holds the two together: the stock schemathesis CLI checks
every answer against these schemas. Every model allows fields it does not name, so a field
added later is not a breaking change for a client generated today.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from gpu_manager.api.body import Body
from gpu_manager.api.models_more import CostFigure, HostStatus, ServeStatus
from gpu_manager.units.states import ServiceState


def json_int(value: object) -> object:
    """An integer as JSON Schema has it: 5 and 5.0, not `true` or "5" (pydantic's lax mode
    takes those, its strict mode refuses 5.0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


JsonInt = Annotated[int, BeforeValidator(json_int)]


# ---- status ---------------------------------------------------------------------------------


class VramProcess(Body):
    pid: int
    name: str | None
    memory_mb: int | None
    service: str | None = Field(description="The managed service it belongs to; null: foreign")


class DeviceProcess(Body):
    pid: int
    name: str | None
    memory_mb: int | None
    kind: str | None
    util_pct: int | None = Field(
        default=None, description="This process's SM utilisation (%); null: not reported")


class Device(Body):
    index: int
    name: str | None
    uuid: str | None
    total_mb: int | None
    used_mb: int | None
    free_mb: int | None
    reserved_mb: int | None
    temperature_c: int | None
    utilization_percent: int | None
    processes: list[DeviceProcess] | None
    lost: bool
    error: str | None


class Vram(Body):
    total_mb: int | None
    used_mb: int | None
    free_mb: int | None
    available_mb: int | None = Field(description="Free minus the reserve: what a start can use")
    reserve_mb: int
    processes: list[VramProcess] | None = Field(description="null: the list is unknown")
    temperature_c: int | None
    utilization_percent: int | None
    device: int = Field(description="The device the inventory plans on (gpu.device)")
    source: str = Field(description="nvml, simulated, or declared (degraded: no probe)")
    error: str | None
    foreign_mb: int | None = Field(description="Used by processes the daemon did not start")
    devices: list[Device]
    updated_at: float | None


class ServiceStatus(Body):
    state: ServiceState
    vram_mb: int
    priority: int
    phases: list[int]
    type: str
    preemptible: bool
    measured_mb: int | None
    pids: list[int]
    pids_error: str | None
    sleep: str | None = Field(description="Its sleep API; null: it cannot sleep")
    residual_mb: int | None
    prewarmed: bool
    sleeps: int
    wakes: int
    reason: str | None
    since: float
    restarts: int
    health: str | None
    last_exit: str | None
    faults: int
    removed: bool | None = Field(None, description="true: no longer in the inventory, and "
                                 "still running")
    devices: list[int] = Field(description="The cards it runs (or last ran) on; [] before "
                               "its first start")
    allowed_devices: list[int] | None = Field(description="The cards it may be placed on "
                                              "(`device`/`devices`); null: any")
    gpus: int = Field(description="How many cards it needs at once")
    serve: ServeStatus | None = Field(None, description="The front door's figures for a "
                                      "service with `serve:`; null: not served")
    host_ram_mb: int | None = Field(None, description="Host RAM its sleep holds (measured "
                                    "once it slept, else `sleep.host_ram_mb`); null: no sleep")
    host_ram_measured: bool = False
    sleep_unavailable: str | None = Field(None, description="Why its sleep cannot be used "
                                          "here (cuda-checkpoint without the driver's API); "
                                          "a release stops it instead")
    costs: dict[str, CostFigure] = Field(default_factory=dict, description="Learned, per kind "
                                         "(start, wake, sleep, stop, reclaim): the median of "
                                         "the last 20 measured")


class HeldFor(Body):
    kind: Literal["operation", "leases", "daemon", "legacy", "releasing", "none", "unknown"]
    operations: list[dict[str, str]] = Field(description="[{id, label}] in flight")
    leases: list[str] = Field(description="Session ids of the client leases")
    legacy: str | None = Field(description="The holder's name when code outside the daemon "
                               "holds the lock")


class LockStatus(Body):
    held_for: HeldFor
    holder: str | None = Field(description="The lock key's value (what legacy code reads)")
    ttl: float | None
    ttl_ms: int | None
    backend: str
    by_daemon: bool
    ok: bool
    error: str | None
    checked_at: float


class LeaseSummary(Body):
    session_id: str
    requester: str
    vram_mb: int | None
    priority: int
    devices: list[int] = Field(description="The card(s) it holds (several GPUs); [] otherwise")


class Card(Body):
    """One managed GPU as the planner counts it."""

    index: int
    uuid: str | None
    name: str | None
    total_mb: int | None
    used_mb: int | None
    free_mb: int | None
    reserve_mb: int
    available_mb: int | None = Field(description="Free minus the reserve")
    foreign_mb: int | None = Field(description="Used by processes the daemon does not manage")
    temperature_c: int | None
    utilization_percent: int | None
    services: dict[str, int | None] = Field(description="Each service on it, with the MB "
                                            "measured there (null: not measurable)")


class PhaseInfo(Body):
    name: str
    services: list[str]
    keep: list[str] = Field(description="Kept up through the phase while they still fit")
    next: int | None = Field(description="The phase that usually follows (prewarm)")


class Status(Body):
    vram: Vram = Field(description="The primary card (`gpu.device`, or the first of "
                       "`gpu.devices`)")
    gpus: list[Card] = Field(description="Every managed card (one on a single-GPU host)")
    placement: Literal["best_fit", "spread"]
    host: HostStatus | None = Field(None, description="The host RAM sleepers fill")
    services: dict[str, ServiceStatus]
    lock: LockStatus
    phase: int | None
    leases: list[LeaseSummary]
    waiting: list[str] = Field(description="Sessions whose acquire waits for room, in order")
    sleeping: list[str]
    prewarmed: list[str]
    operations: list[str] = Field(description="Ids of the operations in flight")
    phases: dict[str, PhaseInfo] = Field(description="The inventory's phases, by number")


# ---- plans and operations -------------------------------------------------------------------


class PlanRequest(Body):
    kind: str = Field(description="PreparePhase, StartService, StopService, SleepService, "
                      "StopAll or Prewarm, with its arguments beside it")


class PlanStep(Body):
    action: str = Field(description="stop, start, sleep or wake")
    service: str
    mb: int
    reason: str
    preemption: bool
    after: list[int] = Field(description="Indices of the steps this one waits for")
    devices: list[int] = Field(description="The cards it acts on (several GPUs; [] on one)")


class Plan(Body):
    ok: Literal[True]
    request: PlanRequest
    budget_mb: int
    used_before_mb: int
    used_after_mb: int
    free_after_mb: int
    steps: list[PlanStep]


class Blocker(Body):
    name: str
    mb: int
    reason: str
    device: int | None = Field(None, description="The card it blocks (several GPUs)")


class RefusedPlan(Body):
    ok: Literal[False]
    request: PlanRequest
    error: str
    detail: str
    short_mb: int = Field(description="MB missing for the request to fit")
    blockers: list[Blocker] = Field(description="What stands in the way, and why")


class StepRecord(Body):
    action: str
    service: str
    mb: int
    reason: str
    preemption: bool
    status: str = Field(description="pending, running, done, failed or skipped")
    started_at: float | None
    duration_s: float | None
    reclaim_wait_s: float | None
    detail: str | None
    after: list[int]
    devices: list[int] = Field(description="The cards it acts on (several GPUs; [] on one)")
    how: str = Field("", description="A sleep by its `release:` ladder's cuda-checkpoint: "
                     "\"checkpoint\"; else \"\"")


class Operation(Body):
    id: str
    request: PlanRequest
    status: str = Field(description="queued, running, succeeded, failed or interrupted")
    dry_run: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration_s: float | None
    deadline_s: float | None
    budget_mb: int | None
    used_before_mb: int | None
    used_after_mb: int | None
    steps: list[StepRecord]
    error: Any = None


class Done(Body):
    """A transition that ran to its end (wait=true)."""

    success: Literal[True]
    operation_id: str
    plan: Operation
    phase: int | None = None
    service: str | None = None
    message: str | None = Field(None, description="release-all: what it stopped")


class DryRun(Body):
    """The plan, not executed (dry_run=true)."""

    success: Literal[True]
    dry_run: Literal[True]
    plan: Plan
    phase: int | None = None
    service: str | None = None


class Accepted(Body):
    """Queued (wait=false): follow it at `url`."""

    operation_id: str
    status: str
    url: str
    phase: int | None = None
    service: str | None = None


class Operations(Body):
    operations: list[Operation]


# ---- errors ---------------------------------------------------------------------------------


class Error(Body):
    """Every refusal and failure: a code, what happened, and what the code carries."""

    error: str = Field(description="A stable code: unknown_service, insufficient_vram, "
                       "lock_held, start_failed, ...")
    detail: Any = Field(description="What happened, for a person")
    plan: RefusedPlan | None = Field(None, description="A refused dry run: the plan's "
                                     "blockers and MB short")
    short_mb: int | None = Field(None, description="insufficient_vram: MB missing")
    blockers: list[Blocker] | None = Field(None, description="insufficient_vram: what stands "
                                           "in the way, and why")
    operation: Operation | None = Field(None, description="The operation that failed")
    gpu_state: dict[str, Any] | None = Field(None, description="The GPU as a failed "
                                             "transition left it")
    holder: str | None = Field(None, description="lock_held: who holds it")
    ttl: float | None = None
    error_id: str | None = Field(None, description="internal: find it in the daemon's log")


class Issue(Body):
    loc: list[str | int]
    msg: str


class Invalid(Body):
    """422: the request does not fit the schema (`invalid_request`, a list of issues), or a
    reload found the inventory files invalid (`invalid_config`, a text naming file:line)."""

    error: Literal["invalid_request", "invalid_config"]
    detail: list[Issue] | str


# ---- probes and admin -----------------------------------------------------------------------


class Health(Body):
    status: Literal["ok"]
    version: str


class Ready(Body):
    ready: bool
    probe: dict[str, Any]
    lock: dict[str, Any]
    accepting: bool
    started_in_s: float | None
    config: dict[str, Any]


class Reloaded(Body):
    success: Literal[True]
    detail: Any


class Released(Body):
    released: bool
