"""Commands that work without a daemon: check-config, plan (local), sim."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gpu_manager.cli.client import (
    DaemonUnreachable,
    TokenOpt,
    UrlOpt,
    call,
    fail,
    print_operation,
)
from gpu_manager.cli.common import JsonOpt, app, err, out
from gpu_manager.cli.options import ConfigDirOpt
from gpu_manager.config import ConfigError, Inventory, load_inventory
from gpu_manager.paths import sim_dir
from gpu_manager.planner import (
    ObservedState,
    Plan,
    PlannerInventory,
    PreparePhase,
    Refusal,
    plan,
)
from gpu_manager.planner.serialize import plan_dict
from gpu_manager.sim.registry import SimRegistry


def _load(config_dir: Path | None) -> Inventory:
    try:
        return load_inventory(config_dir)
    except ConfigError as exc:
        for issue in exc.issues:
            err.print(str(issue), markup=False, highlight=False)
        err.print(f"{len(exc.issues)} problem(s) in the inventory", style="red")
        raise typer.Exit(1) from None


@app.command("check-config")
def check_config(config_dir: ConfigDirOpt = None, probe: Annotated[bool, typer.Option(
        "--probe", help="Also ask this host's driver what the inventory needs of it "
        "(cuda-checkpoint: the driver's version and API)")] = False) -> None:
    """Validate services.yaml and phases.yaml; print each problem as file:line: field: message."""
    inv = _load(config_dir)
    for issue in inv.warnings:
        err.print(f"warning: {issue}", markup=False, highlight=False)
    out.print(f"OK: {inv.summary()}", markup=False, highlight=False)
    if probe:
        _probe_sleep(inv)


def _probe_sleep(inv: Inventory) -> None:
    """Each `cuda-checkpoint` service: can this host checkpoint it, and if not, why."""
    from gpu_manager.units.checkpoint_sleep import (  # noqa: PLC0415 - only with --probe
        make_checkpointer,
        why_not,
    )

    names = [n for n, c in inv.services.items()
             if c.sleep is not None and c.sleep.api == "cuda-checkpoint"]
    if not names:
        out.print("probe: no service sleeps by cuda-checkpoint", markup=False)
        return
    cap = asyncio.run(make_checkpointer(inv.gpu.backend == "simulated", sim_dir())
                      .capability())
    for name in names:
        why = why_not(inv.services[name], cap)
        verdict = (f"available ({cap.driver})" if why is None
                   else f"NOT available: {why}; a release stops it instead")
        out.print(f"probe: {name}: cuda-checkpoint {verdict}", markup=False, soft_wrap=True)


def _parse_running(running: str) -> dict[str, int | None]:
    """`a,b=5000` -> {a: None, b: 5000}: names, optionally with a measured MB."""
    result: dict[str, int | None] = {}
    for item in filter(None, (p.strip() for p in running.split(","))):
        name, _, mb = item.partition("=")
        try:
            result[name] = int(mb) if mb else None
        except ValueError:
            raise typer.BadParameter(f"{item!r}: expected NAME or NAME=MB") from None
    return result


@app.command("plan")
def plan_cmd(
    phase: Annotated[int, typer.Argument(help="Phase number to prepare.")],
    config_dir: ConfigDirOpt = None,
    running: Annotated[str, typer.Option(
        "--running", "-r", help="Services running now, comma-separated; NAME=MB adds a measured "
        "usage. Default: nothing running.")] = "",
    total_mb: Annotated[int | None, typer.Option(help="GPU total [default: gpu.total_mb]")] = None,
    foreign_mb: Annotated[int, typer.Option(help="VRAM used by unmanaged processes")] = 0,
    current_phase: Annotated[int | None, typer.Option(help="The phase active now")] = None,
    local: Annotated[bool, typer.Option(
        "--local", help="Plan here from the inventory, even when a daemon is up")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what preparing PHASE would stop and start, with reasons (nothing is executed).

    With a daemon up (and no --local/--running), the daemon plans against what really runs.
    """
    if not (local or running or total_mb or foreign_mb or current_phase is not None):
        try:
            code, body = call("POST", f"/gpu/prepare-phase/{phase}", url, token,
                              params={"dry_run": "true"}, timeout=30)
        except DaemonUnreachable:
            err.print("(no daemon answering: planning locally against 'nothing running')",
                      style="dim")
        else:
            if as_json:
                print(json.dumps(body, indent=2))
            elif code < 400:
                print_operation({**body, "plan": body["plan"]})
                print_plan_summary(body["plan"])
            else:
                fail(code, body)
            raise typer.Exit(0 if code < 400 else 1)
    inv = _load(config_dir)
    total = total_mb if total_mb is not None else inv.gpu.total_mb
    if total is None:
        err.print("gpu.total_mb is not set (NVML backend): pass --total-mb", style="red")
        raise typer.Exit(2)
    run = _parse_running(running)
    unknown = sorted(set(run) - set(inv.services))
    if unknown:
        err.print(f"unknown service(s) in --running: {', '.join(unknown)} "
                  f"(known: {', '.join(sorted(inv.services))})", style="red", markup=False)
        raise typer.Exit(2)
    state = ObservedState(total, run, inv.gpu.reserve_mb, foreign_mb, current_phase)
    result = plan(PlannerInventory.from_inventory(inv), state, PreparePhase(phase))
    if as_json:
        print(json.dumps(plan_dict(result), indent=2))
    else:
        print_plan(result)
    if isinstance(result, Refusal):
        raise typer.Exit(1)


def print_plan_summary(plan: dict[str, object]) -> None:
    out.print(f"budget {plan['budget_mb']} MB: used {plan['used_before_mb']} -> "
              f"{plan['used_after_mb']} MB, {plan['free_after_mb']} MB free after")


def print_plan(result: Plan | Refusal) -> None:
    if isinstance(result, Refusal):
        err.print(f"refused ({result.code}): {result.message}", markup=False, highlight=False)
        return
    if not result.steps:
        out.print("nothing to do: the GPU is already in that state")
    else:
        table = Table("#", "action", "service", "MB", "reason")
        for i, step in enumerate(result.steps, start=1):
            sign = "-" if step.action == "stop" else "+"
            table.add_row(str(i), step.action, step.service, f"{sign}{step.mb}", step.reason)
        out.print(table)
    out.print(f"budget {result.budget_mb} MB: used {result.used_before_mb} -> "
              f"{result.used_after_mb} MB, {result.free_after_mb} MB free after")


sim_app = typer.Typer(help="The simulated GPU: inspect it, inject foreign usage.",
                       no_args_is_help=True)
app.add_typer(sim_app, name="sim")


@sim_app.command("foreign")
def sim_foreign(
    mb: Annotated[int, typer.Argument(help="MB used by processes gpu-manager does not manage")],
    device: Annotated[int, typer.Option(help="GPU index")] = 0,
) -> None:
    """Model a desktop or an unmanaged job using MB of the simulated GPU (0 clears it)."""
    if mb < 0:
        err.print("MB must be >= 0", style="red")
        raise typer.Exit(2)
    registry = SimRegistry(sim_dir())
    registry.set_foreign(mb, device)
    out.print(f"foreign usage on simulated GPU {device}: {mb} MB ({registry.root})")


@sim_app.command("status")
def sim_status(as_json: JsonOpt = False) -> None:
    """Show what the simulated GPU holds: live registrations and foreign usage."""
    registry = SimRegistry(sim_dir())
    regs = registry.active()
    data = {"dir": str(registry.root), "gpu": registry.gpu(), "foreign_mb": registry.foreign(),
            "processes": [dataclasses.asdict(r) for r in regs]}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    table = Table("pid", "name", "device", "MB", "state")
    for r in regs:
        table.add_row(str(r.pid), r.name, str(r.device), str(r.mb),
                      "running" if r.dead_since is None else "released soon")
    out.print(table)
    out.print(f"gpu {data['gpu']}, foreign {data['foreign_mb']} ({registry.root})")


