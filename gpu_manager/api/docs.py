"""Which statuses each route documents in OpenAPI, with their body models.

Every status a route can answer is listed, and only those: a generated client branches on
them, and the contract tests (schemathesis) fail on one that is sent but not declared.
"""

from __future__ import annotations

from typing import Any

from gpu_manager.api.models import Error, Invalid

WHY = {
    401: "A token is configured and the request does not carry it (`Authorization: Bearer "
         "<token>`, or `X-Service-Token`).",
    403: "`forbidden_host`: the Host is not one this daemon answers to (DNS rebinding); "
         "`cross_origin`: a mutating call from another origin's web page.",
    404: "`unknown_service` / `unknown_phase` / `unknown_operation`: the detail lists what "
         "is known.",
    409: "The plan cannot be carried out: `insufficient_vram` (with the blockers and the MB "
         "short), `needed_by_phase`, `cannot_sleep`, `not_running`, `unmanaged_device` (it "
         "runs on a card this daemon does not manage: stop it).",
    413: "`payload_too_large`: the body is larger than `GPU_MANAGER_MAX_BODY_BYTES`.",
    415: "`unsupported_media_type`: a mutating call's body must be JSON.",
    422: "`invalid_request`: the request does not match the schema (a list of issues).",
    423: "`lock_held`: someone else holds the GPU lock (`holder`, `ttl`).",
    429: "`too_many_operations`: too many operations queued; `queue_timeout`: it waited "
         "`GPU_MANAGER_QUEUE_WAIT_S` for its turn; retry after `Retry-After`.",
    502: "`start_failed` / `stop_failed`: a service did not start or stop (with `gpu_state`); "
         "`sleep_failed`: a sleep asked for by name ended in a stop (`success: false`, "
         "`stopped: true`, the detail says why).",
    503: "`shutting_down` (the daemon is stopping; an operation it cancelled for that says "
         "so), `lock_unavailable`, `lock_lost` or `probe_unavailable`.",
    504: "`reclaim_timeout`: the VRAM did not come back in time; `deadline_exceeded`: the plan "
         "ran past the sum of its steps' deadlines.",
}
# What any operation through the planner may answer (besides 200/202 and the request's own).
TRANSITION = (409, 423, 429, 502, 503, 504)


def answers(*codes: int, ok: Any = None, accepted: Any = None,
            why: dict[int, str] | None = None,
            body: Any = None) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: `ok` the 200 model, `accepted` the 202 one, then `codes`
    with the error model (422 with its own), and 403 always (the Host check is on every
    route). `body`: the model of the route's own refusals (those in `why`) where they keep
    its success shape (the lease protocol's), instead of the error model."""
    out: dict[int | str, dict[str, Any]] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": "OK"}
    if accepted is not None:
        out[202] = {"model": accepted, "description": "Queued (`wait=false`): follow `url`."}
    for code in sorted({403, *codes}):
        text = (why or {}).get(code) or WHY[code]
        own = body is not None and code in (why or {})
        model = Invalid if code == 422 else body if own else Error
        out[code] = {"model": model, "description": text}
    return out
