"""`gpu-manager fleet ...`: join a host to a fleet on Ray, and see the fleet."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from gpu_manager.cli.client import TokenOpt, UrlOpt, call, request
from gpu_manager.cli.common import JsonOpt, app, err, out
from gpu_manager.cli.options import ConfigDirOpt
from gpu_manager.config import ConfigError, load_inventory
from gpu_manager.config.fleet import HOST_LABEL, LABEL_VALUE, PORT_LABEL
from gpu_manager.fleet.members import VRAM_RESOURCE

fleet_app = typer.Typer(help="Several hosts on Ray (the `fleet` extra).", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")


def join_line(address: str | None, host: str, port: int, vram_mb: int | None,
              head: bool = False, ray: str = "ray") -> list[str]:
    """The `ray start` command that makes this host a fleet host: its node labelled with
    the host name and the daemon's port, its GPUs' MB as a static resource."""
    argv = [ray, "start"]
    argv += ["--head", *(["--port", address.rpartition(":")[2]] if address else [])] if head \
        else [f"--address={address}"]
    argv += ["--labels", f"{HOST_LABEL}={host},{PORT_LABEL}={port}"]
    if vram_mb:
        argv += ["--resources", json.dumps({VRAM_RESOURCE: vram_mb})]
    return argv


@fleet_app.command("join")
def join(address: Annotated[str | None, typer.Option(
            help="The Ray head's address (host:port) [default: fleet.address]")] = None,
         host: Annotated[str | None, typer.Option(
            help="This host's fleet name [default: fleet.host]")] = None,
         port: Annotated[int | None, typer.Option(
            help="The daemon's port [default: $GPU_MANAGER_PORT, else 8000]")] = None,
         vram_mb: Annotated[int | None, typer.Option(
            help="The GPUs' MB in all [default: the daemon's /gpu/status]")] = None,
         head: Annotated[bool, typer.Option(help="Start the head node (the first host)")] = False,
         run: Annotated[bool, typer.Option(help="Run it instead of printing it")] = False,
         config_dir: ConfigDirOpt = None, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Print (or --run) the `ray start` line for this host."""
    fleet = None
    with contextlib.suppress(ConfigError):  # a broken inventory is check-config's to report
        fleet = load_inventory(config_dir).fleet
    address = address or (fleet.address if fleet else None)
    host = host or (fleet.host if fleet else None)
    if not host or not LABEL_VALUE.match(host):
        err.print("a host name ([A-Za-z0-9._-], 1-63) is needed: --host or fleet.host")
        raise typer.Exit(2)
    if not address and not head:
        err.print("the Ray head's address is needed: --address or fleet.address")
        raise typer.Exit(2)
    port = port or int(os.environ.get("GPU_MANAGER_PORT", "8000"))
    if vram_mb is None:
        vram_mb = _daemon_vram(url or f"http://127.0.0.1:{port}", token)
    argv = join_line(address, host, port, vram_mb, head,
                     shutil.which("ray") or str(Path(sys.executable).with_name("ray")))
    if not run:
        out.print(shlex.join(argv), markup=False, highlight=False, soft_wrap=True)
        return
    # the raylet hands its environment to every Ray worker: no daemon token goes with it
    secret = {"GPU_MANAGER_TOKEN", *((fleet.token_env,) if fleet and fleet.token_env else ())}
    os.execvpe(argv[0], argv, {k: v for k, v in os.environ.items() if k not in secret})


def _daemon_vram(url: str, token: str | None) -> int | None:
    try:
        code, body = call("GET", "/gpu/status", url, token, timeout=5)
    except Exception:
        return None
    if code != 200 or not isinstance(body, dict):
        return None
    cards = body.get("gpus") or []
    total = sum(int(c.get("total_mb") or 0) for c in cards if isinstance(c, dict))
    return total or (body.get("vram") or {}).get("total_mb")


@fleet_app.command("status")
def status(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every host of the fleet: reachable or not, VRAM, services."""
    body = request("GET", "/fleet/status", url, token, as_json)
    if as_json:
        return
    for h in body.get("hosts", []):
        vram = h.get("vram") or {}
        state = "up" if h.get("reachable") else f"DOWN ({h.get('error')})"
        running = [n for n, s in (h.get("services") or {}).items()
                   if s.get("state") in ("ready", "starting", "sleeping")]
        out.print(f"{h['host']:<16} {state:<12} {vram.get('used_mb')}/{vram.get('total_mb')} MB"
                  f"  {', '.join(running) or '-'}", markup=False, highlight=False)
