"""Client verbs: talk to a running daemon over HTTP (status, phase, start, stop, ...)."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from gpu_manager.cli.common import JsonOpt, app, err, out

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOpt = Annotated[str | None, typer.Option(
    "--url", help=f"The daemon [default: $GPU_MANAGER_URL, else {DEFAULT_URL}]")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", help="Bearer token [default: $GPU_MANAGER_TOKEN]", show_default=False)]


class DaemonUnreachable(Exception):
    pass


def call(method: str, path: str, url: str | None, token: str | None,
         params: dict[str, Any] | None = None, timeout: float = 600) -> tuple[int, Any]:
    base = url or os.environ.get("GPU_MANAGER_URL") or DEFAULT_URL
    token = token or os.environ.get("GPU_MANAGER_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=base, timeout=timeout, trust_env=False) as client:
            resp = client.request(method, path, params=params, headers=headers)
    except httpx.TransportError as exc:
        raise DaemonUnreachable(f"no gpu-manager daemon at {base} ({exc})") from exc
    try:
        body = resp.json()
    except ValueError:
        body = {"error": "bad_response", "detail": resp.text[:200]}
    return resp.status_code, body


def fail(code: int, body: Any) -> None:
    detail = body.get("detail") if isinstance(body, dict) else body
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    error = body.get("error", "error") if isinstance(body, dict) else "error"
    err.print(f"error ({code} {error}): {detail}", markup=False, highlight=False)
    raise typer.Exit(1)


def request(method: str, path: str, url: str | None, token: str | None, as_json: bool,
            params: dict[str, Any] | None = None) -> Any:
    try:
        code, body = call(method, path, url, token, params)
    except DaemonUnreachable as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(body, indent=2))
    if code >= 400:
        if as_json:
            raise typer.Exit(1)
        fail(code, body)
    return body


def bar(used: int | None, total: int | None, width: int = 40) -> str:
    if not used or not total:
        return "[" + "?" * width + "]" if used is None else "[" + " " * width + "]"
    filled = min(width, round(width * used / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def print_status(body: dict[str, Any]) -> None:
    vram = body["vram"]
    cards = {g["index"]: g for g in body.get("gpus") or []}
    several = len(cards) > 1
    for dev in vram.get("devices") or []:
        used, total = dev.get("used_mb"), dev.get("total_mb")
        label = f"GPU {dev['index']} {dev.get('name') or ''}".strip()
        extra = " LOST" if dev.get("lost") else ""
        card = cards.get(dev["index"])
        if several and card is not None:  # who holds what on each card
            held = ", ".join(f"{n} {mb if mb is not None else '?'}"
                             for n, mb in card["services"].items())
            extra += f"; available {card['available_mb']} MB" + (f"; {held}" if held else "")
        elif several:
            extra += " (not managed)"
        out.print(f"{label}: {bar(used, total)} {used if used is not None else '?'} / "
                  f"{total if total is not None else '?'} MB used{extra}", markup=False)
    src = vram.get("source")
    note = f" ({vram['error']})" if vram.get("error") else ""
    out.print(f"source {src}{note}; available {vram.get('available_mb')} MB after a "
              f"{vram.get('reserve_mb')} MB reserve; phase {body.get('phase')}", markup=False)
    table = Table("service", "state", "type", "VRAM MB", "measured", "prio", "phases",
                  *(["GPU"] if several else []), "reason")
    for name, s in body["services"].items():
        state = s["state"] + (" (prewarmed)" if s.get("prewarmed") else "")
        allowed = s.get("allowed_devices")
        gpu = (",".join(map(str, s.get("devices") or [])) or "-") + (
            "" if allowed is None else f" (pinned {','.join(map(str, allowed))})")
        table.add_row(name, state, s["type"], str(s["vram_mb"]),
                      "-" if s.get("measured_mb") is None else str(s["measured_mb"]),
                      str(s["priority"]), ",".join(map(str, s["phases"])) or "-",
                      *([gpu] if several else []), s.get("reason") or "")
    out.print(table)
    lock = body["lock"]
    holder = lock.get("holder") or "free"
    ttl = f", {lock['ttl']}s left" if lock.get("ttl") is not None else ""
    out.print(f"lock ({lock.get('backend')}): {holder}{ttl}", markup=False)


def print_operation(body: dict[str, Any]) -> None:
    plan = body.get("plan") or {}
    steps = plan.get("steps") or []
    if body.get("dry_run"):
        out.print("dry run: nothing was done")
    if not steps:
        out.print("nothing to do: the GPU is already in that state")
        return
    several = any(s.get("devices") for s in steps)
    table = Table("#", "action", "service", "MB", *(["GPU"] if several else []), "reason",
                  "took")
    for i, s in enumerate(steps, start=1):
        took = f"{s['duration_s']:.2f}s" if s.get("duration_s") is not None else ""
        table.add_row(str(i), s["action"], s["service"], str(s["mb"]),
                      *([",".join(map(str, s.get("devices") or []))] if several else []),
                      s["reason"], took)
    out.print(table)
    if plan.get("duration_s") is not None:
        out.print(f"done in {plan['duration_s']:.2f}s")


def mutate(path: str, url: str | None, token: str | None, as_json: bool,
           params: dict[str, Any] | None = None) -> None:
    """POST a transition and print the plan it executed (or the JSON)."""
    body = request("POST", path, url, token, as_json, params)
    if not as_json:
        print_operation(body)


@app.command("status")
def status(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show VRAM, each service's state and the GPU lock holder."""
    body = request("GET", "/gpu/status", url, token, as_json)
    if not as_json:
        print_status(body)


@app.command("phase")
def phase(number: int, url: UrlOpt = None, token: TokenOpt = None,
          as_json: JsonOpt = False) -> None:
    """Prepare the GPU for pipeline phase NUMBER (stops and starts services)."""
    mutate(f"/gpu/prepare-phase/{number}", url, token, as_json)


@app.command("start")
def start(name: str, url: UrlOpt = None, token: TokenOpt = None,
          as_json: JsonOpt = False) -> None:
    """Start service NAME, preempting lower-priority services if it must."""
    mutate(f"/gpu/service/{name}/start", url, token, as_json)


@app.command("stop")
def stop(name: str, force: Annotated[bool, typer.Option(
            help="Stop it even if the current phase needs it")] = False,
         url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Stop service NAME."""
    mutate(f"/gpu/service/{name}/stop", url, token, as_json,
           {"force": "true"} if force else None)


@app.command("sleep")
def sleep(name: str, force: Annotated[bool, typer.Option(
            help="Put it to sleep even if the current phase needs it")] = False,
          url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Put service NAME to sleep: its VRAM is freed, its process stays (start wakes it)."""
    mutate(f"/gpu/service/{name}/sleep", url, token, as_json,
           {"force": "true"} if force else None)


@app.command("release-all")
def release_all(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Stop every managed service."""
    mutate("/gpu/release-all", url, token, as_json)


@app.command("models")
def models(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List the models the front door serves (/v1/models), with their service's state and
    its requests in flight, waiting, and idle timer."""
    listed = request("GET", "/v1/models", url, token, as_json)
    if as_json:
        return
    services = request("GET", "/gpu/status", url, token, False)["services"]
    table = Table("model", "service", "state", "in flight", "waiting", "started by requests",
                  "idle for", box=None)
    for m in listed["data"]:
        serve = (services.get(m["service"]) or {}).get("serve") or {}
        idle = serve.get("idle") or {}
        quiet = idle.get("idle_for_s")
        table.add_row(m["id"], m["service"], m["state"], str(serve.get("in_flight", 0)),
                      str(serve.get("waiting", 0)), str(serve.get("request_starts", 0)),
                      "-" if quiet is None else f"{quiet:.0f}s of {idle['after_s']:g}s")
    if not listed["data"]:
        out.print("no model is served (add a `serve:` block with `models:` to a service)")
        return
    out.print(table)
