"""The fleet (#25): what placing over several hosts costs, how it grows to 10 hosts, how long
a task on a lost host takes to finish elsewhere, and that the fleet extra stays out of the
single-host start. `python -m bench fleet [--calls 300 --curve-calls 150 --losses 3 --runs 5]`
(~2 min on 2 cores; needs the fleet extra: `uv sync --extra fleet`).

1. placement: a real fleet on loopback (tests/support/fleet.py: three Ray nodes, a daemon
   each on a simulated 24, 16 and 8 GB card): `POST /fleet/acquire?dry_run=true` (6000 MB)
   on host a, against host a's own `POST /gpu/acquire/plan` (the single-host fit check the
   fleet asks every host) in the same run, in alternating blocks: the ratio.
2. curve: 1, 3, 5 and 10 hosts. Ten Ray nodes do not fit on 2 cores, so 10 real daemons run
   (their `fleet:` names an unused Ray address: never asked) and an in-process
   `Fleet` over `StaticMembership` places the same dry-run lease: p50 per size, the ratio
   to 1 host, to the same N dry runs asked one after another, and the asking process's own
   CPU per placement (what hosts on separate machines would not share). What it leaves out
   is Ray's node table read (timed in 1).
3. host loss: a `gpu_manager.fleet.remote(vram_mb=6000)` task lands on c (the best fit) and
   blocks there; c's node is removed (its raylet killed): the time from the removal to
   `ray.get` returning from its second run on another host, and to host a's /fleet/status
   showing c dead, under Ray's health checks of tests/support/fleet.py (SYSTEM). Then c
   rejoins on a new node (its daemon kept) and is lost again: `--losses` samples.
4. start: cold start to /ready of the daemon alone and with `fleet:` (5 runs each,
   alternating), Ray not mapped in the fleet daemon's process, `ray` not in sys.modules after
   `import gpu_manager.api.app`, and `import ray` as a floor (what it would add).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import pct, row, write
from bench.footprint import floor
from gpu_manager.config.fleet import FleetConfig
from gpu_manager.fleet.members import Host, StaticMembership
from gpu_manager.fleet.peers import Peers
from gpu_manager.fleet.runner import Fleet, Target
from tests.support.daemon import DaemonProc
from tests.support.env import free_port, wait_for
from tests.support.fleet import SYSTEM, inventory

SIZES = {"a": 24576, "b": 16384, "c": 8192}
# the curve's ten cards: mixed, so best fit has something to choose
CURVE_MB = [24576, 16384, 8192, 49152, 12288, 24576, 16384, 81920, 8192, 32768]
CURVE_N = (1, 3, 5, 10)
LEASE_MB = 6000
now = time.perf_counter


def stats(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(ms, 50), 2), "p99_ms": round(pct(ms, 99), 2), "n": len(ms)}


# -- 1. placement over 3 hosts vs one host's own fit check -----------------------------------
def node_table(address: str, calls: int) -> dict[str, float]:
    """What each placement pays first with `membership_ttl_s: 0` (the fleet's inventory in
    tests/support/fleet.py): Ray's node table through a GCS client, as the daemon reads it."""
    from gpu_manager.fleet.members import RayMembership

    async def run() -> list[float]:
        members = RayMembership(address, 3.0, 0.0)
        await members.hosts()  # the client's connection
        ms = []
        for _ in range(calls):
            t0 = now()
            await members.hosts()
            ms.append((now() - t0) * 1000)
        await members.aclose()
        return ms

    return stats(asyncio.run(run()))


def placement(a: DaemonProc, address: str, calls: int) -> dict[str, Any]:
    plan = {"priority": 1, "vram_mb": LEASE_MB}
    lease = {"session_id": "bench-fleet", "requester": "bench", "vram_mb": LEASE_MB}
    hosts: set[str] = set()
    ms: dict[str, list[float]] = {"fleet": [], "host": []}
    with httpx.Client(base_url=a.url, trust_env=False, timeout=30) as http:

        def one(way: str) -> None:
            t0 = now()
            if way == "fleet":
                r = http.post("/fleet/acquire", params={"dry_run": "true"}, json=lease)
            else:
                r = http.post("/gpu/acquire/plan", json=plan)
            took = (now() - t0) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"{way}: {r.status_code} {r.text[:300]}")
            if way == "fleet":
                hosts.add(r.json()["host"])
            ms[way].append(took)

        for way in ("host", "fleet") * 20:  # warm-up: connections, Ray's GCS client
            one(way)
        ms = {"fleet": [], "host": []}
        size = 25
        for b in range(max(1, calls // size)):  # A B B A ...: a drift hits both
            for way in ("host", "fleet") if b % 2 == 0 else ("fleet", "host"):
                for _ in range(size):
                    one(way)
    fleet, host = stats(ms["fleet"]), stats(ms["host"])
    return {"fleet": fleet, "host_plan": host, "chosen": sorted(hosts),
            "node_table_read": node_table(address, calls // 5),
            "ratio_p50": round(fleet["p50_ms"] / host["p50_ms"], 2),
            "ratio_p99": round(fleet["p99_ms"] / host["p99_ms"], 2), "samples_ms": ms}


# -- 2. the curve to 10 hosts (real daemons, in-process Fleet, static membership) ------------
def curve(tmp: Path, calls: int) -> dict[str, Any]:
    daemons: list[DaemonProc] = []
    try:
        for i, mb in enumerate(CURVE_MB[:max(CURVE_N)]):
            d = DaemonProc(tmp / f"h{i}")
            services, phases = inventory(mb, f"127.0.0.1:{free_port()}", f"h{i}")
            (d.config_dir / "services.yaml").write_text(services)
            (d.config_dir / "phases.yaml").write_text(phases)
            daemons.append(d.start())
        hosts = [Host(f"h{i}", d.url, f"{i:056x}", True, CURVE_MB[i])
                 for i, d in enumerate(daemons)]
        return asyncio.run(_curve(hosts, calls))
    finally:
        for d in daemons:
            d.close()


async def _curve(hosts: list[Host], calls: int) -> dict[str, Any]:
    members = StaticMembership([])
    fleet = Fleet(FleetConfig(address=f"127.0.0.1:{free_port()}", host="h0"), members,
                  Peers(None, 5.0))
    target = Target(f"a lease of {LEASE_MB} MB", "/gpu/acquire/plan", "/gpu/acquire",
                    plan_body={"priority": 1, "vram_mb": LEASE_MB},
                    act_body={"session_id": "bench", "requester": "bench",
                              "vram_mb": LEASE_MB}, unknown="")
    ms: dict[int, list[float]] = {n: [] for n in CURVE_N}
    serial: dict[int, list[float]] = {n: [] for n in CURVE_N}
    cpu: dict[int, list[float]] = {n: [] for n in CURVE_N}  # the asking process's own
    chosen: dict[int, set[str]] = {n: set() for n in CURVE_N}
    try:
        async def one(n: int) -> None:
            members.set(hosts[:n])
            t0, c0 = now(), time.process_time()
            placed = await fleet.place(target, dry_run=True)
            ms[n].append((now() - t0) * 1000)
            cpu[n].append((time.process_time() - c0) * 1000)
            chosen[n].add(placed.host.name)
            # the baseline: the same N dry runs asked one after another
            t0 = now()
            for h in hosts[:n]:
                await fleet.peers.call(h, "POST", target.plan_path, json=target.plan_body)
            serial[n].append((now() - t0) * 1000)

        for n in CURVE_N:  # warm-up: a keep-alive connection to each daemon
            for _ in range(5):
                await one(n)
        ms, serial = {n: [] for n in CURVE_N}, {n: [] for n in CURVE_N}
        cpu = {n: [] for n in CURVE_N}
        size = 10
        for b in range(max(1, calls // size)):  # sizes in turn, reversed every other block
            for n in CURVE_N if b % 2 == 0 else CURVE_N[::-1]:
                for _ in range(size):
                    await one(n)
    finally:
        await fleet.aclose()
    base = pct(ms[1], 50)
    return {str(n): {**stats(ms[n]), "ratio_to_1": round(pct(ms[n], 50) / base, 2),
                     "serial_p50_ms": round(pct(serial[n], 50), 2),
                     "asker_cpu_p50_ms": round(pct(cpu[n], 50), 2),
                     "ratio_to_serial": round(pct(ms[n], 50) / pct(serial[n], 50), 2),
                     "chosen": sorted(chosen[n])} for n in CURVE_N}


# -- 3. a host lost mid-task -----------------------------------------------------------------
def _job(flags: str, block_on: str) -> str:
    """Runs where the fleet placed it; on `block_on`'s node it waits (for its node to die)."""
    import ray

    node = str(ray.get_runtime_context().get_node_id())
    Path(flags, f"started-{node}").touch()
    deadline = time.monotonic() + 60
    while node == block_on and time.monotonic() < deadline:
        time.sleep(0.05)
    return node


def host_loss(f: Any, tmp: Path) -> dict[str, Any]:
    import ray

    from gpu_manager.fleet import remote

    a = f.daemons["a"]
    job = remote(vram_mb=LEASE_MB, fleet=a.url)(_job)
    c_node = f.node_id("c")
    flags = tmp
    flags.mkdir(parents=True, exist_ok=True)
    t_submit = now()
    ref = job.remote(str(flags), c_node)
    wait_for((flags / f"started-{c_node}").exists, 60, "the task running on c")
    started_s = now() - t_submit
    held = [x["requester"] for x in f.daemons["c"].status()["leases"]]
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch(t0: float) -> None:  # host a's fleet view, 10 times a second
        with httpx.Client(base_url=a.url, trust_env=False, timeout=5) as http:
            while not stop.is_set() and "dead" not in seen:
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    hosts = {h["host"]: h for h in http.get("/fleet/status").json()["hosts"]}
                    if not hosts["c"]["ray_alive"]:
                        seen["dead"] = now() - t0
                stop.wait(0.1)

    t0 = now()
    f.remove("c")
    watcher = threading.Thread(target=watch, args=(t0,), daemon=True)
    watcher.start()
    try:
        node = ray.get(ref, timeout=120)
        done_s = now() - t0
        wait_for(lambda: "dead" in seen, 20, "host a's fleet view marking c dead")
    finally:
        stop.set()
        watcher.join(10)
    ran_on = next((h for h, n in f.nodes.items() if str(n.node_id) == node), node)
    return {"task_started_s": round(started_s, 2), "lease_on_c": held,
            "finished_elsewhere_s": round(done_s, 2), "status_dead_s": round(seen["dead"], 2),
            "finished_on": ran_on,
            # Ray adds its own keys to the dict Cluster is given: only the health check's
            "health_check": {k: v for k, v in SYSTEM.items() if k.startswith("health_check")}}


def fleet_run(tmp: Path, calls: int, losses: int) -> dict[str, Any]:
    from tests.support.fleet import fleet_on_loopback

    t0 = now()
    with fleet_on_loopback(tmp, SIZES) as f:
        up_s = now() - t0
        out: dict[str, Any] = {"fleet_up_s": round(up_s, 1),
                               "placement": placement(f.daemons["a"], f.cluster.address, calls)}
        out["host_loss"] = []
        for i in range(losses):
            if i:
                rejoin(f, "c")
            out["host_loss"].append(host_loss(f, tmp / f"loss{i}"))
        return out


def rejoin(f: Any, name: str) -> None:
    """A new Ray node for host `name` (its daemon kept running): the fleet takes its live
    node; ready again once host a sees it up and its daemon holds no lease."""
    from tests.support.fleet import NODE

    f.nodes[name] = f.cluster.add_node(**NODE, labels={"fleet-host": name,
                                                       "gpum-port": str(f.daemons[name].port)})
    f.cluster.wait_for_nodes()
    a, d = f.daemons["a"], f.daemons[name]

    def back() -> bool:
        hosts = {h["host"]: h for h in a.get("/fleet/status").json()["hosts"]}
        return bool(hosts[name]["ray_alive"] and hosts[name]["reachable"]
                    and not d.status()["leases"])

    wait_for(back, 60, f"host {name} back in the fleet, its lease taken back")


# -- 4. the fleet extra kept out of the single-host start ------------------------------------
def ray_mapped(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return "_raylet" in Path(f"/proc/{pid}/maps").read_text()
    return False


def start(runs: int) -> dict[str, Any]:
    starts: dict[str, list[float]] = {"alone": [], "fleet": []}
    mapped: list[bool] = []
    control = False
    fleet_yaml = f'\nfleet:\n  address: "127.0.0.1:{free_port()}"\n  host: solo\n'
    for _ in range(runs):
        for way in ("alone", "fleet"):
            with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
                d = DaemonProc(Path(tmp), extra_services=fleet_yaml if way == "fleet" else "")
                try:
                    t0 = now()
                    d.start()
                    starts[way].append(now() - t0)
                    if way == "fleet":
                        assert d.proc is not None
                        mapped.append(ray_mapped(d.proc.pid))
                        if len(mapped) == runs:  # the check's control: the first fleet
                            # question loads Ray (its node table: unanswered here)
                            assert d.get("/fleet/status").status_code == 200
                            control = ray_mapped(d.proc.pid)
                finally:
                    d.close()
    probe = subprocess.run([sys.executable, "-c", "import gpu_manager.api.app, sys; "
                            "print('ray' in sys.modules)"], capture_output=True, text=True,
                           check=True, timeout=60)
    alone, fleet = pct(starts["alone"], 50), pct(starts["fleet"], 50)
    return {"start_s": starts, "alone_p50_s": round(alone, 3), "fleet_p50_s": round(fleet, 3),
            "ratio": round(fleet / alone, 2), "ray_mapped_in_fleet_daemon": any(mapped),
            "ray_mapped_after_a_fleet_question": control,
            "ray_in_sys_modules_after_app_import": probe.stdout.strip() == "True",
            "import_ray_s": round(floor("import ray", runs), 2),
            "import_fastapi_uvicorn_s": round(floor("import fastapi, uvicorn", runs), 2)}


def timed(label: str, fn: Callable[[], Any]) -> Any:
    t0 = now()
    out = fn()
    print(f"  ({label}: {now() - t0:.0f} s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=300, help="placements each way (part 1)")
    ap.add_argument("--curve-calls", type=int, default=150, help="placements per size (part 2)")
    ap.add_argument("--losses", type=int, default=3, help="times host c is lost (part 3)")
    ap.add_argument("--runs", type=int, default=5, help="cold starts each way (part 4)")
    args = ap.parse_args()
    print("fleet: placement over hosts, the curve to 10, a host lost mid-task, the start")
    if importlib.util.find_spec("ray") is None:
        print("  skipped: Ray is not installed (the fleet extra: uv sync --extra fleet)")
        return
    t0, load = now(), [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="gm-bench-fleet-") as tmp:
        cold = timed("start", lambda: start(args.runs))
        sizes = timed("curve", lambda: curve(Path(tmp) / "curve", args.curve_calls))
        ray_run = timed("Ray fleet", lambda: fleet_run(Path(tmp) / "ray", args.calls,
                                                       args.losses))
    p = ray_run["placement"]
    row("placement, 3 hosts: /fleet/acquire?dry_run p50 / p99",
        f"{p['fleet']['p50_ms']:.2f} / {p['fleet']['p99_ms']:.2f} ms", f"chose {p['chosen']}")
    row("one host's /gpu/acquire/plan p50 / p99",
        f"{p['host_plan']['p50_ms']:.2f} / {p['host_plan']['p99_ms']:.2f} ms", "")
    row("placement / single-host fit check (p50)", f"{p['ratio_p50']:.1f}x", "")
    for n, v in sizes.items():
        row(f"in-process Fleet, {n} host(s): p50 / p99",
            f"{v['p50_ms']:.2f} / {v['p99_ms']:.2f} ms", f"{v['ratio_to_1']:.1f}x of 1 host, "
            f"{v['ratio_to_serial']:.2f}x one by one, asker CPU {v['asker_cpu_p50_ms']:.2f} ms")
    for loss in ray_run["host_loss"]:
        row("host c lost: task finished elsewhere", f"{loss['finished_elsewhere_s']:.2f} s",
            f"on {loss['finished_on']}; c dead in /fleet/status {loss['status_dead_s']:.2f} s")
    row("Ray's node table read (GCS client) p50", f"{p['node_table_read']['p50_ms']:.2f} ms",
        "")
    row("cold start alone / with fleet: (p50)",
        f"{cold['alone_p50_s']:.2f} / {cold['fleet_p50_s']:.2f} s", f"{cold['ratio']:.2f}x")
    row("ray loaded by the daemon's start", str(cold["ray_in_sys_modules_after_app_import"]
                                               or cold["ray_mapped_in_fleet_daemon"]),
        f"import ray alone: {cold['import_ray_s']:.2f} s")
    data = {"command": " ".join(["python -m bench fleet", *sys.argv[1:]]),
            "seconds": round(now() - t0, 1), "loadavg_before": load, "lease_mb": LEASE_MB,
            "hosts_mb": SIZES, "curve_mb": CURVE_MB, "start": cold, "curve": sizes, **ray_run}
    print(f"  -> {write('fleet', data)}")


if __name__ == "__main__":
    main()
