"""Client leases over HTTP: the newer coordinator protocol (/gpu/acquire, /gpu/release,
/gpu/state) and the older one the existing GPUClient speaks (/gemma/request,
/gemma/release/{task_id}, /status), byte-compatible with interfaces.md §3.

These bodies follow that protocol (its `error` is a message), not our `{error, detail}` form.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model

from gpu_manager.api.body import Body
from gpu_manager.api.docs import answers
from gpu_manager.api.errors import ApiError
from gpu_manager.api.models import DryRun, JsonInt, json_int
from gpu_manager.api.status import vram
from gpu_manager.daemon import Daemon
from gpu_manager.orchestrator.cards import visible_ids
from gpu_manager.planner import Refusal
from gpu_manager.planner.serialize import plan_dict

# JSON as the schema says: `false` is no number of MB, "5" no priority.
STRICT = ConfigDict(strict=True)
SessionId = Annotated[str, Field(min_length=1, max_length=200)]
B = TypeVar("B", bound=BaseModel)


class AcquireBody(BaseModel):
    model_config = STRICT
    session_id: SessionId
    requester: str = Field(min_length=1, max_length=200)
    priority: Annotated[Literal[1, 2], BeforeValidator(json_int)] = 1
    timeout_ms: JsonInt = Field(default=15_000, ge=0, le=600_000)
    # the bound before the validator: after it, pydantic writes `ge` into the schema, not `minimum`
    vram_mb: Annotated[int, Field(ge=0), BeforeValidator(json_int)] | None = None
    ttl_s: float | None = Field(default=None, gt=0)
    metadata: dict[str, Any] | None = None
    # Several GPUs: the card wanted (an index the daemon manages); null: any that fits.
    device: Annotated[int, Field(ge=0, le=63), BeforeValidator(json_int)] | None = None
    # The client's process as this host sees it: its memory (and its children's) on the
    # GPU is the lease's, not foreign use counted on top of the lease's claim.
    pid: Annotated[int, Field(ge=1, le=2**22), BeforeValidator(json_int)] | None = None
    # The highest priority the grant may preempt (-1: none): a fleet sends what its
    # placement chose; a grant that would need more is refused instead.
    max_preempt: Annotated[int, Field(ge=-1, le=1_000_000), BeforeValidator(json_int)] | \
        None = None
    # false: no wait for room: what cannot be granted now is refused at once (409).
    wait: bool = True


class PlanBody(BaseModel):
    """An acquire's fit check: what granting it would do now (nothing is reserved)."""

    model_config = STRICT
    priority: Annotated[Literal[1, 2], BeforeValidator(json_int)] = 1
    vram_mb: Annotated[int, Field(ge=0), BeforeValidator(json_int)] | None = None
    device: Annotated[int, Field(ge=0, le=63), BeforeValidator(json_int)] | None = None


class ReleaseBody(BaseModel):
    model_config = STRICT
    session_id: SessionId
    requester: str | None = None
    result: Any = None


class RenewBody(BaseModel):
    model_config = STRICT
    session_id: SessionId
    requester: str | None = None


class GemmaRequest(BaseModel):
    # the old client sends chat fields we ignore
    model_config = ConfigDict(extra="allow", strict=True)
    task_id: SessionId
    messages: list[Any] = Field(default_factory=list)
    context: list[Any] = Field(default_factory=list)
    max_tokens: JsonInt = 0
    temperature: float = 0.0


class LeaseAnswer(Body):
    success: bool
    session_id: str
    acquired_at: str | None = Field(description="ISO 8601; null when not acquired")
    error: str | None
    wait_time_ms: int
    vram_mb: int | None
    ttl_s: float | None
    device: int | None = Field(
        default=None, description="The card granted (several GPUs); null otherwise")
    cuda_visible_devices: str | None = Field(
        default=None, description="What the client sets CUDA_VISIBLE_DEVICES to (several "
        "GPUs): the granted card's UUID")


class ReleaseAnswer(Body):
    success: bool
    session_id: str
    released_at: str | None
    session_duration_ms: int | None
    error: str | None = None
    cancelled: bool = Field(default=False, description="The session's acquire was still "
                            "in flight: it was cancelled, nothing is held.")
    lost: bool = Field(default=False, description="The lease had been lost (the GPU lock went "
                       "to someone else): nothing to release.")


class RenewAnswer(Body):
    success: bool
    session_id: str
    expires_in_s: float | None = None
    error: str | None = None
    lost: bool = Field(default=False, description="The lease was taken from the client: the "
                       "GPU lock went to someone else (`error` says why). Stop using the "
                       "GPU; acquire again.")


class LeaseState(Body):
    owner: str | None
    session_id: str | None
    requester: str | None
    acquired_at: str | None
    state: Literal["acquired", "idle"]
    redis_connected: bool
    leases: list[dict[str, Any]]


class GemmaAnswer(Body):
    task_id: str
    status: str = Field(description="gpu_acquired or failed")
    message: str | None


class GemmaReleased(Body):
    status: Literal["released", "not_found"]
    task_id: str


class LegacyStatus(Body):
    status: str
    gpu_available: bool
    current_owner: str | None
    active_sessions: list[str]
    vram: dict[str, int | None]


NOT_GRANTED = {409: "Not granted in time (the body says why, with the same shape).",
               503: "The lock backend is unavailable, or the daemon is shutting down."}
LOST = {409: "The lease was lost: the GPU lock went to someone else (`lost: true`, "
             "`error` says why)."}


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def engine_of(task_id: str) -> str:
    match = re.fullmatch(r"ml-(.+)-[0-9a-f]{8}", task_id)
    return match.group(1) if match else task_id


def with_cards(body: type[B], cards: list[int]) -> type[B]:
    """`body` for this daemon: its `device` one of the cards it manages (the schema says
    which, so a generated client never sends another; another is a 422)."""
    def managed(v: int) -> int:
        if v not in cards:
            raise ValueError(f"device {v} is not managed by this daemon (devices: "
                             f"{', '.join(map(str, cards))})")
        return v

    enum: list[Any] = list(cards)
    device: Any = Annotated[int, Field(json_schema_extra={"enum": enum}),
                            BeforeValidator(json_int), AfterValidator(managed)] | None
    return create_model(body.__name__, __base__=body, device=(device, None))


def make_router(daemon: Daemon, auth: Any, post: tuple[int, ...]) -> APIRouter:
    """`post`: what every mutating route answers before it runs (app.py's POST)."""
    router = APIRouter(tags=["leases"])
    deps = [Depends(auth)]
    cards = [c.index for c in daemon.inventory.gpu.managed]
    Body_, PlanBody_ = with_cards(AcquireBody, cards), with_cards(PlanBody, cards)

    async def acquire(body: AcquireBody, request: Request) -> JSONResponse:
        res = await daemon.leases.acquire(body.session_id, body.requester, body.priority,
                                          body.timeout_ms, body.vram_mb, body.ttl_s,
                                          body.metadata, device=body.device, pid=body.pid,
                                          max_preempt=body.max_preempt, wait=body.wait)
        if res.code == "invalid":  # a bad request, not a refusal: the one 422 shape
            return JSONResponse({"error": "invalid_request", "detail": [
                {"loc": ["body", "device"], "msg": res.error}]}, status_code=422)
        lease = res.lease
        if lease is not None:
            # Granted: did this caller get it? A caller that gave up (its retry, if any,
            # joined this same acquire and hears it there) leaves a grant nobody holds,
            # which then expires within seconds instead of its whole TTL.
            daemon.leases.answered(body.session_id, not await request.is_disconnected())
        cards = lease.devices if lease else ()
        payload = {"success": lease is not None, "session_id": body.session_id,
                   "acquired_at": iso(lease.acquired_at) if lease else None,
                   "error": res.error, "wait_time_ms": res.wait_ms,
                   "vram_mb": lease.vram_mb if lease else None,
                   "ttl_s": lease.ttl_s if lease else None,
                   "device": cards[0] if cards else None,
                   "cuda_visible_devices": ",".join(
                       visible_ids(daemon.poller.latest, cards)) if cards else None}
        code = 200 if lease else 503 if res.code == "unavailable" else 409
        await daemon.refresh_lock_info()
        return JSONResponse(payload, status_code=code)

    # validated (and documented) as this daemon's body: its cards
    acquire.__annotations__["body"] = Body_
    router.post("/gpu/acquire", dependencies=deps,
                responses=answers(*post, 409, 503, ok=LeaseAnswer, why=NOT_GRANTED,
                                  body=LeaseAnswer))(acquire)

    async def acquire_plan(body: PlanBody) -> dict[str, Any]:
        """The plan an acquire would run now: whom it would preempt, what is left free.
        A fleet asks every host this before it places a lease."""
        result = await daemon.leases.plan(body.priority, body.vram_mb, body.device)
        if isinstance(result, str):
            raise ApiError("insufficient_vram", result)
        if isinstance(result, Refusal):
            raise ApiError(result.code, result.message, plan=plan_dict(result))
        return {"success": True, "dry_run": True, "plan": plan_dict(result)}

    acquire_plan.__annotations__["body"] = PlanBody_  # validated as this daemon's body
    router.post("/gpu/acquire/plan", dependencies=deps, responses=answers(
        *post, 409, ok=DryRun, why={409: "`insufficient_vram`: it cannot be granted now "
                                         "without a wait (the plan's blockers, MB short), "
                                         "or ever (more than the card can give)."}))(acquire_plan)

    @router.post("/gpu/release", dependencies=deps, responses=answers(
        *post, 404, 409, ok=ReleaseAnswer, why={404: "No such active session.", **LOST},
        body=ReleaseAnswer))
    async def release(body: ReleaseBody) -> JSONResponse:
        in_flight = daemon.leases.in_flight(body.session_id)
        lease = await daemon.leases.release(body.session_id)
        now = time.time()
        if lease is None and in_flight:  # its acquire was still going: cancelled
            return JSONResponse({"success": True, "session_id": body.session_id,
                                 "released_at": iso(now), "session_duration_ms": 0,
                                 "cancelled": True})
        if lease is None:
            lost = daemon.leases.lost(body.session_id)
            return JSONResponse({"success": False, "session_id": body.session_id,
                                 "released_at": None, "session_duration_ms": None,
                                 "error": f"lost: {lost.reason}" if lost
                                 else "no such active session", "lost": lost is not None},
                                status_code=409 if lost else 404)
        held_ms = int((now - (lease.acquired_at or now)) * 1000)
        await daemon.refresh_lock_info()
        return JSONResponse({"success": True, "session_id": body.session_id,
                             "released_at": iso(now), "session_duration_ms": held_ms})

    @router.post("/gpu/renew", dependencies=deps, responses=answers(
        *post, 404, 409, ok=RenewAnswer, why={404: "No such active session (expired?).",
                                               **LOST}, body=RenewAnswer))
    async def renew(body: RenewBody) -> JSONResponse:
        lease = daemon.leases.renew(body.session_id)
        if lease is None:
            lost = daemon.leases.lost(body.session_id)
            if lost is not None:
                return JSONResponse({"success": False, "session_id": body.session_id,
                                     "error": lost.reason, "lost": True}, status_code=409)
            return JSONResponse({"success": False, "session_id": body.session_id,
                                 "error": "no such active session (expired?)"}, status_code=404)
        return JSONResponse({"success": True, "session_id": body.session_id,
                             "expires_in_s": lease.ttl_s})

    @router.get("/gpu/state", responses=answers(ok=LeaseState))
    async def state() -> dict[str, Any]:
        leases = daemon.leases.active
        first = leases[0] if leases else None
        info = daemon.lock_info
        return {
            "owner": first.requester if first else None,
            "session_id": first.session_id if first else None,
            "requester": first.requester if first else None,
            "acquired_at": iso(first.acquired_at) if first else None,
            "state": "acquired" if first else "idle",
            "redis_connected": info.ok if info.backend == "redis" else False,
            "leases": [{"session_id": x.session_id, "requester": x.requester,
                        "priority": x.client_priority, "vram_mb": x.vram_mb,
                        "acquired_at": iso(x.acquired_at),
                        "expires_in_s": round(x.expires - time.monotonic(), 1)}
                       for x in leases],
        }

    @router.post("/gemma/request", dependencies=deps,
                 responses=answers(*post, 409, 503, ok=GemmaAnswer, why=NOT_GRANTED,
                                   body=GemmaAnswer))
    async def gemma_request(body: GemmaRequest, x_service_id: Annotated[
            str | None, Header()] = None) -> JSONResponse:
        requester = x_service_id or engine_of(body.task_id)
        cfg = daemon.inventory.leases
        res = await daemon.leases.acquire(body.task_id, requester, 1,
                                          int(cfg.legacy_wait_s * 1000), legacy=True)
        if res.lease is None:
            return JSONResponse({"task_id": body.task_id, "status": "failed",
                                 "message": res.error},
                                status_code=503 if res.code == "unavailable" else 409)
        return JSONResponse({"task_id": body.task_id, "status": "gpu_acquired",
                             "message": f"GPU acquired for {requester} "
                                        f"({res.lease.vram_mb} MB, waited {res.wait_ms} ms)"})

    @router.post("/gemma/release/{task_id}", dependencies=deps, responses=answers(
        *post, 404, ok=GemmaReleased, why={404: "No such task holds the GPU."},
        body=GemmaReleased))
    async def gemma_release(task_id: str) -> JSONResponse:
        lease = await daemon.leases.release(task_id)
        if lease is None:
            return JSONResponse({"status": "not_found", "task_id": task_id}, status_code=404)
        return JSONResponse({"status": "released", "task_id": task_id})

    @router.get("/status", responses=answers(ok=LegacyStatus))
    async def legacy_status() -> dict[str, Any]:
        leases = daemon.leases.active
        v = vram(daemon, daemon.orchestrator.observed())
        return {"status": "healthy", "gpu_available": not leases,
                "current_owner": leases[0].requester if leases else None,
                "active_sessions": [x.session_id for x in leases],
                "vram": {k: v[k] for k in ("total_mb", "used_mb", "free_mb", "available_mb")}}

    return router
