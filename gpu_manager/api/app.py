"""The HTTP API (FastAPI; OpenAPI at /docs). Shapes follow interfaces.md §2, plus the plan."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query
from fastapi.responses import JSONResponse, Response
from loguru import logger

from gpu_manager import __version__, frontdoor
from gpu_manager.api import errors, events, leases, metrics, web
from gpu_manager.api import models as m
from gpu_manager.api.auth import make_auth
from gpu_manager.api.docs import TRANSITION, answers
from gpu_manager.api.errors import ApiError
from gpu_manager.api.security import Policy, SecurityMiddleware
from gpu_manager.api.status_cache import StatusCache
from gpu_manager.config import Inventory
from gpu_manager.daemon import Daemon, arm_exit_watchdog
from gpu_manager.fleet import api as fleet_api
from gpu_manager.fleet.api import make_fleet
from gpu_manager.orchestrator import Operation
from gpu_manager.planner import (
    PreparePhase,
    Refusal,
    SleepService,
    StartService,
    StopAll,
    StopService,
)
from gpu_manager.planner.model import Request as PlanRequest
from gpu_manager.planner.serialize import plan_dict
from gpu_manager.settings import Settings

DryRun = Annotated[bool, Query(description="Return the plan without acting.")]
Wait = Annotated[bool, Query(description="false: answer 202 at once with an operation id.")]
MaxPreempt = Annotated[int | None, Query(ge=-1, le=1_000_000, description=(
    "The highest priority the plan may preempt (-1: none); a plan that needs more is "
    "refused (409). A fleet sends what its placement chose."))]


def create_app(settings: Settings, inventory: Inventory | None = None, *,
               exit_watchdog: bool = False) -> FastAPI:
    """`exit_watchdog`: the serving process (not an in-process test) exits at the latest
    `bounds.exit_watchdog_s` after the daemon stopped, even if a driver thread hangs."""
    daemon = Daemon(settings, inventory)
    registry = metrics.make_registry(daemon)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await daemon.start()
        door.attach()
        if door.idle is not None:
            daemon.supervisor.spawn("front-door-idle", door.idle.run)
        yield
        # Graceful shutdown: refuse new mutations, let the transitions in flight finish
        # within what is left of the budget counted from SIGTERM (then they are cancelled
        # and their callers answered), optionally stop the services, release the GPU lock.
        orch = daemon.orchestrator
        deadline = daemon.begin_shutdown()
        logger.info(f"graceful shutdown: finishing {orch.pending} operation(s) in flight, "
                    f"then {'stopping' if settings.on_shutdown == 'stop' else 'leaving'} "
                    "the managed services")
        # prewarm and wake-when-free first: they would hold the queue a stop-all waits in
        await orch.followups.settle()
        await daemon.leases.close()
        await daemon.finish_operations(deadline)
        await door.aclose()  # requests still relayed are cut; their clients hear 503
        if fleet is not None:
            await fleet.aclose()
        if settings.on_shutdown == "stop":
            try:
                async with asyncio.timeout(max(5.0, deadline - time.monotonic())):
                    await daemon.orchestrator.execute(Operation(StopAll()))
            except Exception as exc:
                logger.error(f"graceful shutdown: stopping the services failed: {exc}")
        await daemon.stop()
        if exit_watchdog:
            arm_exit_watchdog(daemon.bounds.exit_watchdog_s)

    app = FastAPI(title="gpu-manager", version=__version__, lifespan=lifespan,
                  description="Coordinates GPU-hungry services on one GPU host.")
    app.state.daemon = daemon
    status_cache = daemon.status_cache = StatusCache(daemon)
    errors.install(app)
    # The front door (/v1, /svc) runs inside the security middleware added next.
    door = daemon.door = frontdoor.install(app, daemon, settings, registry)
    # Host, Origin and content-type checks before any route (see security.py for why).
    app.add_middleware(SecurityMiddleware, policy=Policy.from_settings(settings))
    token = settings.token_value()

    authorized = make_auth(token)
    Auth = Depends(authorized)
    # what every mutating route may answer before it runs: no token, a foreign Origin (403,
    # always documented), a body too large, not JSON, or that does not fit the schema
    POST = (*((401,) if token else ()), 413, 415, 422)
    # Examples from the inventory at start-up (the schema is built once; a reload may change
    # the names, an example need not be exhaustive): /docs and contract tests start from
    # requests that reach the planner, not only 404s.
    inv = daemon.inventory
    # (defaults, not Annotated aliases: FastAPI resolves annotations in the module's globals)
    name_ = Path(description="A service of services.yaml",
                 examples=sorted(inv.services)[:3] or ["comfyui"])
    phase_ = Path(description="A phase of phases.yaml", examples=sorted(inv.phases)[:3] or [1])

    async def run(req: PlanRequest, dry_run: bool, wait: bool, **shape: Any) -> Any:
        if not daemon.accepting:
            raise ApiError("shutting_down", "the daemon is shutting down")
        orch = daemon.orchestrator
        name = getattr(req, "name", None)
        if name is not None and name not in orch.inventory.services:
            # (a client lease's name, `lease:<id>`, is the planner's but no service)
            known = ", ".join(sorted(orch.inventory.services)) or "(none)"
            raise ApiError("unknown_service", f"unknown service {name!r} (known: {known})")
        if dry_run:
            result = await orch.dry_run(req)
            if isinstance(result, Refusal):
                raise ApiError(result.code, result.message, plan=plan_dict(result))
            return {"success": True, "dry_run": True, **shape, "plan": plan_dict(result)}
        # Every operation submitted counts until it is done, waited for or not: cap them,
        # so `wait=false` requests cannot queue without bound. (A request that joins the
        # identical one in flight adds nothing to the queue.)
        pending, limit = orch.pending, settings.max_pending_operations
        if pending >= limit and not orch.would_join(req):
            raise ApiError("too_many_operations",
                           f"{pending} operations are queued or running (the limit is {limit}); "
                           "retry once some have finished", queued=pending, limit=limit)
        op, task, joined = orch.submit(req)
        if not wait:
            return JSONResponse({"operation_id": op.id, "status": op.status,
                                 "url": f"/gpu/operations/{op.id}", "joined": joined, **shape},
                                status_code=202)
        try:
            # Shielded: a client that disconnects must not cancel a transition halfway.
            await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if not task.cancelled() or (me is not None and me.cancelling()):
                raise  # this request is being cancelled, not (only) the operation
            _, why = op.cancelled_because or ("shutting_down", "the operation was cancelled")
            raise ApiError("shutting_down", why, operation=op.as_dict(), **shape) from None
        except Exception as exc:
            raise errors.from_exception(exc, operation=op.as_dict(), **shape) from exc
        finally:
            # so that a /gpu/status read right after this answer shows the lock as it is now
            await daemon.refresh_lock_info()
        return {"success": True, **shape, "operation_id": op.id, "joined": joined,
                "plan": op.as_dict()}

    app.include_router(leases.make_router(daemon, authorized, POST))
    # the fleet's routes (404 without `fleet:`); Ray itself is imported at its first question
    fleet = (make_fleet(daemon.inventory.fleet, token)
             if daemon.inventory.fleet is not None else None)
    app.include_router(fleet_api.make_router(fleet, authorized, POST))
    app.include_router(events.make_router(daemon))
    web.install(app, daemon)

    @app.get("/health", tags=["probes"], responses=answers(ok=m.Health))
    async def health() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/ready", tags=["probes"], responses=answers(503, ok=m.Ready, why={
        503: "Not ready: the body says which of the probe, the lock or the config is not."},
        body=m.Ready),
        response_class=JSONResponse)
    async def ready() -> JSONResponse:
        """Readiness: the probe and the lock backend are usable (503 with the reason if not)."""
        ok, detail = daemon.readiness()
        return JSONResponse({"ready": ok, **detail}, status_code=200 if ok else 503)

    # The body is built once per change of what it shows, not per request (status_cache.py),
    # and sent as the bytes FastAPI would have made of it: no validation, no serialising.
    # `response_model` only keeps the documented schema what the dict it once returned made it.
    @app.get("/gpu/status", tags=["gpu"], responses=answers(ok=m.Status),
             response_model=dict[str, Any])
    async def gpu_status() -> Response:
        return Response(status_cache.body(), media_type="application/json")

    @app.post("/gpu/prepare-phase/{phase}", tags=["gpu"], dependencies=[Auth],
              responses=answers(*POST, 404, *TRANSITION, ok=m.Done | m.DryRun,
                                accepted=m.Accepted))
    async def prepare_phase(phase: int = phase_, dry_run: DryRun = False, wait: Wait = True,
                            max_preempt: MaxPreempt = None) -> Any:
        return await run(PreparePhase(phase, max_preempt), dry_run, wait, phase=phase)

    @app.post("/gpu/service/{name}/start", tags=["gpu"], dependencies=[Auth],
              responses=answers(*POST, 404, *TRANSITION, ok=m.Done | m.DryRun,
                                accepted=m.Accepted))
    async def start_service(name: str = name_, dry_run: DryRun = False, wait: Wait = True,
                            max_preempt: MaxPreempt = None) -> Any:
        return await run(StartService(name, max_preempt), dry_run, wait, service=name)

    @app.post("/gpu/service/{name}/stop", tags=["gpu"], dependencies=[Auth],
              responses=answers(*POST, 404, *TRANSITION, ok=m.Done | m.DryRun,
                                accepted=m.Accepted))
    async def stop_service(name: str = name_, force: bool = False, dry_run: DryRun = False,
                           wait: Wait = True) -> Any:
        return await run(StopService(name, force), dry_run, wait, service=name)

    @app.post("/gpu/service/{name}/sleep", tags=["gpu"], dependencies=[Auth],
              responses=answers(*POST, 404, *TRANSITION, ok=m.Done | m.DryRun,
                                accepted=m.Accepted))
    async def sleep_service(name: str = name_, force: bool = False, dry_run: DryRun = False,
                            wait: Wait = True) -> Any:
        """Put NAME to sleep (its `sleep:` block): the VRAM comes off the GPU, the process
        stays; starting it wakes it. 409 `cannot_sleep` without a `sleep:` block."""
        return await run(SleepService(name, force), dry_run, wait, service=name)

    @app.post("/gpu/release-all", tags=["gpu"], dependencies=[Auth],
              responses=answers(*POST, *TRANSITION, ok=m.Done | m.DryRun,
                                accepted=m.Accepted))
    async def release_all(dry_run: DryRun = False, wait: Wait = True) -> Any:
        result = await run(StopAll(), dry_run, wait)
        if isinstance(result, dict) and not dry_run:
            stopped = [s["service"] for s in result["plan"]["steps"]]
            result["message"] = (f"stopped {', '.join(stopped)}" if stopped
                                 else "nothing was running")
        return result

    @app.post("/gpu/lock/release", tags=["gpu"], dependencies=[Auth],
              responses=answers(*POST, 503, ok=m.Released))
    async def lock_release() -> dict[str, Any]:
        """Force-release the GPU lock, whoever holds it (an operator's last resort)."""
        bound = 2 * daemon.bounds.lock_io_s
        try:
            # The daemon's own holders first: its leases are told they lost the GPU and
            # its operations stop before their next start (an operator's last resort).
            async with asyncio.timeout(bound):
                revoked = await daemon.orchestrator.keeper.revoke(
                    "force-released by an operator")
                released = await daemon.lock.force_release() or bool(revoked)
        except TimeoutError as exc:
            raise ApiError("lock_unavailable", f"the lock backend did not answer within "
                           f"{bound:g}s") from exc
        except Exception as exc:
            raise errors.from_exception(exc) from exc
        await daemon.refresh_lock_info()
        return {"released": released, "revoked": revoked}

    @app.post("/gpu/reload", tags=["gpu"], dependencies=[Auth],
              responses=answers(*POST, ok=m.Reloaded, why={
                  422: "`invalid_config`: the files are invalid (file:line); the daemon "
                       "goes on with the inventory it had."}), response_class=JSONResponse)
    async def reload() -> JSONResponse:
        """Re-read services.yaml and phases.yaml (as SIGHUP does)."""
        ok, detail = await daemon.reloader.reload()
        if not ok:  # an ApiError: the issues may quote a URL from the files, redacted there
            return ApiError("invalid_config", detail, status=422).response()
        return JSONResponse({"success": True, "detail": detail})

    @app.get("/gpu/operations", tags=["gpu"], responses=answers(422, ok=m.Operations))
    async def operations(limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
        """The most recent operations, newest last (interrupted ones included)."""
        return {"operations": [op.as_dict() for op in daemon.orchestrator.ops.recent(limit)]}

    @app.get("/gpu/operations/{op_id}", tags=["gpu"],
             responses=answers(404, 422, ok=m.Operation, why={
                 404: "`unknown_operation`: not among the last 200."}))
    async def operation(op_id: str) -> dict[str, Any]:
        op = daemon.orchestrator.ops.get(op_id)
        if op is None:
            raise ApiError("unknown_operation", f"no operation {op_id!r} (the last 200 are kept)")
        return op.as_dict()

    @app.get("/metrics", tags=["probes"], response_class=Response, responses={
        200: {"description": "Prometheus text format",
              "content": {metrics.CONTENT_TYPE: {"schema": {"type": "string"}}}},
        **answers()})
    async def prometheus() -> Response:
        return Response(metrics.render(registry), media_type=metrics.CONTENT_TYPE)

    return app
