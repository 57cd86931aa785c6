"""Reproductions behind the figures of bench/transitions_real.py (run by hand; not part of
`python -m bench`). They print what they measure; none asserts.

    python -m bench.repro_transitions prewarm-blocks
    python -m bench.repro_transitions pid-walks [--procs 300]
    python -m bench.repro_transitions cheap-pids [bench.transitions_real options]
    python -m bench.repro_transitions woke-race [--cycles 15]

prewarm-blocks: a phase call that arrives while a prewarm is still cold-starting the services
    of the *predicted* next phase used to queue behind that prewarm for the rest of its cold
    start, even when the call wanted none of those services (the pipeline went 2 -> 4,
    prewarm guessed 3). Fixed on main in baf37ad (a prewarm gives way to any real request):
    3.0 s queued before, 0.01 s after.
pid-walks: the native driver's pid read (`NativeDriver._members`) walks every process on the
    host and reads its environment; the orchestrator reads every unit's pids ~3 times per
    operation (before planning, after the steps, after dropping the lock) and once per
    release step. The cost of one walk grows with the host's process count, and so does every
    transition's overhead: `bench.transitions_real --modes cd --host-procs 300` shows it
    end to end.
cheap-pids: bench.transitions_real with a daemon whose pid read is replaced by one that costs
    next to nothing (the group leader alone; no walk of the host), to show what the walks cost
    a transition. Diagnosis only, not a fix: it misses every other process of the service.
woke-race: a service put to sleep used to be marked awake ("awake on its own: holds 9000 MB,
    more than its 512 MB residual") by a pid refresh running beside the sleep on a GPU
    snapshot taken before the sleep released the memory (the unit turned `sleeping` a moment
    before the executor recorded the release); the daemon then said ready while the server
    slept, and the next start or phase did not wake it. Dry runs in a loop (each refreshes
    the pids) make the window easy to hit. Fixed on main in baf37ad (a refresh ignores
    snapshots older than the state): 5 of 15 sleeps before, 0 of 30 after.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from bench import transitions_real
from bench.transitions_real import prewarm_ops
from bench.transitions_setup import SERVICES, Setup, phases_yaml, services_yaml
from gpu_manager.sim.registry import SimRegistry
from gpu_manager.units.drivers.native import MARKER_ENV, NativeDriver
from tests.support.daemon import DaemonProc
from tests.support.env import free_port, wait_for


def prewarm_blocks() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gm-repro-"))
    setup = Setup(1.0, {s.name: free_port() for s in SERVICES}, 0.1, 0.05, 0.0)  # cold 3 s
    d = DaemonProc(tmp)
    (d.config_dir / "services.yaml").write_text(services_yaml(setup, sleep=True, prewarm=True))
    (d.config_dir / "phases.yaml").write_text(phases_yaml({2: 3}))
    d.start()
    try:
        assert d.post("/gpu/prepare-phase/2").status_code == 200
        wait_for(lambda: any(op["status"] == "running" for op in prewarm_ops(d)), 5,
                 "the prewarm of phase 3 to run")
        time.sleep(0.3)
        print("while the prewarm of phase 3 runs:", d.states())
        t0 = time.monotonic()
        r = d.post("/gpu/prepare-phase/4")  # the pipeline skips phase 3
        wall = time.monotonic() - t0
        op = r.json()["plan"]
        steps = [(s["action"], s["service"], round(s["duration_s"], 2)) for s in op["steps"]]
        print(f"prepare-phase/4: HTTP {r.status_code} in {wall:.2f} s, of which "
              f"{op['started_at'] - op['created_at']:.2f} s queued behind the prewarm; "
              f"steps: {steps}")
    finally:
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)


def woke_race(cycles: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gm-repro-"))
    setup = Setup(1.0, {s.name: free_port() for s in SERVICES}, 0.1, 0.05, 0.0)
    d = DaemonProc(tmp)
    (d.config_dir / "services.yaml").write_text(services_yaml(setup, sleep=True, prewarm=False))
    (d.config_dir / "phases.yaml").write_text(phases_yaml({}))
    d.start()
    done = threading.Event()

    def dry_runs() -> None:  # each one refreshes the pids beside whatever runs
        with httpx.Client(base_url=d.url, trust_env=False, timeout=30) as c:
            while not done.is_set():
                c.post("/gpu/service/vision/start", params={"dry_run": "true"})

    hits = 0
    try:
        assert d.post("/gpu/prepare-phase/2").status_code == 200  # vision, cold
        threading.Thread(target=dry_runs, daemon=True).start()
        for i in range(cycles):
            r = d.post("/gpu/service/vision/sleep", params={"force": "true"})
            detail = r.json()["plan"]["steps"][0]["detail"]
            time.sleep(0.3)
            svc = d.status()["services"]["vision"]
            held = sum(x.mb for x in SimRegistry(d.sim_dir).active() if x.pid in svc["pids"])
            wrong = svc["state"] != "sleeping"
            hits += wrong
            print(f"{i:2d} sleep: {detail!r}; daemon: {svc['state']}; GPU: {held} MB"
                  + (f"  <- {svc.get('reason')}" if wrong else ""))
            r = d.post("/gpu/service/vision/start")  # a wake, or nothing if it thinks awake
            steps = [(s["action"], round(s["duration_s"], 3)) for s in r.json()["plan"]["steps"]]
            print(f"   start: {steps}")
    finally:
        done.set()
        d.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{hits} of {cycles} sleeps left the daemon saying ready while the server sleeps")


def _walk() -> list[psutil.Process]:
    """What NativeDriver._members does for a unit (the token check), on every process."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER_ENV) == "no-such-token":
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def pid_walks(procs: int) -> None:
    def measure() -> str:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            _walk()
            times.append((time.perf_counter() - t0) * 1000)
        return f"{len(psutil.pids())} processes: one walk {sorted(times)[2]:.1f} ms (median of 5)"

    print(measure())
    idle = [subprocess.Popen(["sleep", "600"]) for _ in range(procs)]
    try:
        print(measure())
    finally:
        for p in idle:
            p.kill()
        for p in idle:
            p.wait()


def _cheap_members(self: NativeDriver) -> list[psutil.Process]:
    """The group leader alone: exact for the stand-ins (one process each), and no scan of
    the host (psutil's children() would read every process's stat)."""
    leader = self._leader()
    try:
        return [] if leader is None or leader.status() == psutil.STATUS_ZOMBIE else [leader]
    except psutil.Error:
        return []


def serve_cheap_pids() -> None:
    """The daemon (`gpu-manager serve`) with the cheap pid read."""
    from gpu_manager.cli import main as cli

    NativeDriver._members = _cheap_members  # type: ignore[method-assign]
    sys.argv = ["gpu-manager", "serve"]
    cli()


def cheap_pids(argv: list[str]) -> None:
    def start(self: DaemonProc) -> DaemonProc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.repro_transitions", "serve-cheap-pids"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 30, f"the daemon on {self.url} (log: {self.log})")
        return self

    DaemonProc.start = start  # type: ignore[method-assign]
    transitions_real.main(argv, "python -m bench.repro_transitions cheap-pids")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.repro_transitions")
    ap.add_argument("what", choices=("prewarm-blocks", "pid-walks", "cheap-pids",
                                     "serve-cheap-pids", "woke-race"))
    ap.add_argument("--procs", type=int, default=300)
    ap.add_argument("--cycles", type=int, default=15)
    args, rest = ap.parse_known_args()
    if args.what == "prewarm-blocks":
        prewarm_blocks()
    elif args.what == "pid-walks":
        pid_walks(args.procs)
    elif args.what == "woke-race":
        woke_race(args.cycles)
    elif args.what == "cheap-pids":
        cheap_pids(rest)
    else:
        serve_cheap_pids()


if __name__ == "__main__":
    main()
