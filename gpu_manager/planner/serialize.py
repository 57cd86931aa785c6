"""Plans and refusals as JSON-ready dicts, for the CLI and the HTTP API."""

from __future__ import annotations

import dataclasses
from typing import Any

from gpu_manager.planner.model import Blocker, Plan, Refusal, Request


def request_dict(request: Request) -> dict[str, Any]:
    return {"kind": type(request).__name__, **dataclasses.asdict(request)}


def blocker_dict(b: Blocker) -> dict[str, Any]:
    """A blocker as JSON; `device` only on several GPUs (one-GPU answers stay as they were)."""
    out = {"name": b.name, "mb": b.mb, "reason": b.reason}
    return out if b.device is None else {**out, "device": b.device}


def plan_dict(result: Plan | Refusal) -> dict[str, Any]:
    if isinstance(result, Refusal):
        return {
            "ok": False,
            "request": request_dict(result.request),
            "error": result.code,
            "detail": result.message,
            "short_mb": result.short_mb,
            "blockers": [blocker_dict(b) for b in result.blockers],
        }
    return {
        "ok": True,
        "request": request_dict(result.request),
        "budget_mb": result.budget_mb,
        "used_before_mb": result.used_before_mb,
        "used_after_mb": result.used_after_mb,
        "free_after_mb": result.free_after_mb,
        "steps": [dataclasses.asdict(s) for s in result.steps],
    }
