"""The fleet's routes on every daemon (`fleet:` in services.yaml): any host answers for all.

`GET /fleet/status`, `POST /fleet/prepare-phase/{n}`, `POST /fleet/service/{name}/start`,
`POST /fleet/acquire`: each placed on the host whose own planner has room (`runner.py`), and
answered with that host's answer plus where it went. Without `fleet:` they answer 404
`fleet_disabled`, so a client learns at once that this daemon stands alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from gpu_manager.api.body import Body
from gpu_manager.api.docs import answers
from gpu_manager.api.errors import ApiError
from gpu_manager.api.leases import AcquireBody, LeaseAnswer, ReleaseBody
from gpu_manager.config.fleet import FleetConfig
from gpu_manager.fleet.acquires import FleetAcquires
from gpu_manager.fleet.members import RayMembership
from gpu_manager.fleet.peers import Peers
from gpu_manager.fleet.runner import Fleet, FleetError, Placed, Target

DryRun = Annotated[bool, Query(description="Choose the host, act on none.")]
Exclude = Annotated[list[str] | None, Query(max_length=64, description="Hosts to leave out "
                                            "(a placement that failed there).")]
ServiceName = Annotated[str, Path(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                  description="A service of the hosts' services.yaml")]
WHY = {404: "`fleet_disabled`: this daemon has no `fleet:`; `unknown_phase` / "
            "`unknown_service`: no host of the fleet declares it.",
       409: "`insufficient_vram`: no host has room, even by preempting (`hosts`: each "
            "host's blockers and MB short, or why it could not be asked).",
       502: "The chosen host failed the request (its own answer, with where it went), or "
            "its answer could not be read.",
       503: "`fleet_unavailable`: Ray's node list could not be read, or no host answered.",
       504: "`fleet_unavailable`: the chosen host took the request and did not answer in "
            "time (it may still be running there: not placed again)."}


class FleetStatus(Body):
    enabled: bool
    host: str = Field(description="This daemon's host name in the fleet")
    address: str = Field(description="The Ray cluster's address")
    membership: dict[str, Any] = Field(description="Whether Ray's node list could be read")
    hosts: list[dict[str, Any]] = Field(description="Each host: url, node_id, ray_alive, "
                                        "reachable, error, vram, gpus, services, leases")


class FleetPlaced(Body):
    success: bool
    host: str = Field(description="The host chosen")
    url: str = Field(description="Its daemon's URL")
    node_id: str = Field(description="Its Ray node (NodeAffinitySchedulingStrategy)")
    placement: dict[str, Any] = Field(description="chosen, options, refused, attempts")
    dry_run: bool = False
    result: Any = Field(None, description="The host's own answer to the request")


class FleetAcquireBody(AcquireBody):
    model_config = ConfigDict(strict=True)
    device: None = None  # a card is the chosen host's choice
    # the act's terms are the placement's own (what the chosen host's dry run promised)
    max_preempt: None = None
    wait: Literal[True] = True
    exclude: list[str] = Field(default_factory=list, max_length=64)


class FleetReleased(Body):
    success: bool
    session_id: str
    hosts: list[str] = Field(description="The hosts where the session was released (or its "
                             "acquire in flight cancelled)")


class FleetLeaseAnswer(LeaseAnswer):
    host: str | None = None
    url: str | None = None
    node_id: str | None = None
    placement: dict[str, Any] | None = None


def make_fleet(cfg: FleetConfig, token: str | None) -> Fleet:
    if cfg.token_env:
        token = os.environ.get(cfg.token_env) or token
    return Fleet(cfg, RayMembership(cfg.address, cfg.ray_timeout_s, cfg.membership_ttl_s),
                 Peers(token, cfg.peer_timeout_s))


def make_router(fleet: Fleet | None, auth: Any, post: tuple[int, ...]) -> APIRouter:
    router = APIRouter(tags=["fleet"])
    deps = [Depends(auth)]
    many = answers(*post, 404, 409, 502, 503, 504, ok=FleetPlaced, why=WHY)

    def need() -> Fleet:
        if fleet is None:
            raise ApiError("fleet_disabled", "this daemon is not part of a fleet (no `fleet:` "
                           "in services.yaml)", status=404)
        return fleet

    async def placed(target: Target, dry_run: bool, exclude: list[str] | None) -> Any:
        with refusal():
            p = await need().place(target, dry_run=dry_run, exclude=frozenset(exclude or ()))
        return _answer(p, dry_run)

    @router.get("/fleet/status", responses=answers(404, ok=FleetStatus, why=WHY))
    async def status() -> dict[str, Any]:
        """Every host of the fleet: reachable or not, VRAM per card, services, leases."""
        return await need().status()

    @router.post("/fleet/prepare-phase/{phase}", dependencies=deps, responses=many)
    async def prepare_phase(phase: Annotated[int, Path()], dry_run: DryRun = False,
                            exclude: Exclude = None) -> Any:
        """Run phase N on the host where it fits best (see README "Several hosts")."""
        return await placed(Target(f"phase {phase}", f"/gpu/prepare-phase/{phase}?dry_run=true",
                                   f"/gpu/prepare-phase/{phase}", unknown="unknown_phase"),
                            dry_run, exclude)

    @router.post("/fleet/service/{name}/start", dependencies=deps, responses=many)
    async def start(name: ServiceName, dry_run: DryRun = False,
                    exclude: Exclude = None) -> Any:
        """Start NAME on a host that declares it and has room for it."""
        return await placed(Target(f"service {name}", f"/gpu/service/{name}/start?dry_run=true",
                                   f"/gpu/service/{name}/start"), dry_run, exclude)

    acquires = FleetAcquires(fleet) if fleet is not None else None
    if fleet is not None and acquires is not None:
        fleet.closers.append(acquires.aclose)

    @router.post("/fleet/acquire", dependencies=deps, responses=answers(
        *post, 404, 409, 502, 503, 504, ok=FleetLeaseAnswer, why=WHY))
    async def acquire(body: FleetAcquireBody, request: Request, dry_run: DryRun = False) -> Any:
        """A lease on the host that can give the VRAM: the answer is that host's lease,
        with its `url` (renew and release there) and `cuda_visible_devices`. A retry with the
        same session id joins the placement in flight (and its answer, for a few seconds
        after). `pid` is not passed on: it names a process of the caller's host, not of the
        host chosen (acquire at that host's own daemon to tie a lease to a process)."""
        want = {"priority": body.priority, "vram_mb": body.vram_mb}
        lease = body.model_dump(exclude={"exclude", "device", "pid", "max_preempt", "wait"},
                                exclude_none=True)
        target = Target(f"a lease of {body.vram_mb if body.vram_mb is not None else 'all'} MB",
                        "/gpu/acquire/plan", "/gpu/acquire", plan_body=want, act_body=lease,
                        unknown="", lease=True,
                        deadline=time.monotonic() + body.timeout_ms / 1000)
        if dry_run:
            return await placed(target, True, body.exclude)
        need()  # 404 without a fleet
        assert acquires is not None  # with a fleet, there are its acquires

        async def connected() -> bool:
            return not await request.is_disconnected()

        with refusal():
            p = await acquires.acquire(body.session_id, lambda: need().place(
                target, exclude=frozenset(body.exclude)), connected)
        return _answer(p, False)

    @router.post("/fleet/release", dependencies=deps, responses=answers(
        *post, 404, 503, ok=FleetReleased, why=WHY))
    async def release(body: ReleaseBody) -> dict[str, Any]:
        """Release a session wherever it is held (or its acquire in flight): every live
        host is asked. For a client that lost track of where its lease went."""
        f = need()
        with refusal():
            hosts = [h for h in await f.hosts() if h.alive]
        replies = await asyncio.gather(*(f.peers.call(h, "POST", "/gpu/release", json={
            "session_id": body.session_id}) for h in hosts))
        done = sorted(r.host.name for r in replies if r.ok)
        return {"success": bool(done), "session_id": body.session_id, "hosts": done}

    return router


@contextlib.contextmanager
def refusal() -> Iterator[None]:
    """The fleet's refusal as the API's error (its code, status, every host's answer)."""
    try:
        yield
    except FleetError as exc:
        raise ApiError(exc.code, exc.detail, status=exc.status, **exc.extra) from None


def _answer(p: Placed, dry_run: bool) -> Any:
    where = p.as_dict()
    if dry_run or p.reply is None:
        return {"success": True, "dry_run": True, **where}
    body = p.reply.body
    if p.reply.status is None:  # sent, not answered: it may still run there
        raise ApiError("fleet_unavailable", f"{p.host.name} did not answer: {p.reply.error}",
                       status=504 if p.reply.timed_out else 502, **where)
    status = p.reply.status
    if status >= 500 and status not in (502, 503, 504):
        status = 502  # the host failed (a 500 of its own): a bad gateway, as documented
    if isinstance(body, dict) and "session_id" in body:  # a lease: the host's answer, flat
        return JSONResponse({**body, **where}, status_code=status)
    if status >= 300:
        return JSONResponse({**(body if isinstance(body, dict) else {"detail": body}),
                             **where}, status_code=status)
    return {"success": True, **where, "result": body}
