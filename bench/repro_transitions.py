"""Two reproductions behind the figures of bench/transitions_real.py (run by hand; not part of
`python -m bench`). Both print what they measure; neither asserts.

    python -m bench.repro_transitions prewarm-blocks
    python -m bench.repro_transitions pid-walks [--procs 300]

prewarm-blocks: a phase call that arrives while a prewarm is still cold-starting the services
    of the *predicted* next phase queues behind that prewarm operation for the rest of its cold
    start, even when the call wants none of those services (the pipeline went 2 -> 4, prewarm
    guessed 3). Prewarmed services rank below everything in the planner, but the operation
    that starts them holds the transition lock until they are ready.
pid-walks: the native driver's pid read (`NativeDriver._members`) walks every process on the
    host and reads its environment; the orchestrator reads every unit's pids ~3 times per
    operation (before planning, after the steps, after dropping the lock) and once per
    release step. The cost of one walk grows with the host's process count, and so does every
    transition's overhead: `bench.transitions_real --modes cd --host-procs 300` shows it
    end to end.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from bench.transitions_real import SERVICES, Setup, phases_yaml, prewarm_ops, services_yaml
from gpu_manager.units.drivers.native import MARKER_ENV
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


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.repro_transitions")
    ap.add_argument("what", choices=("prewarm-blocks", "pid-walks"))
    ap.add_argument("--procs", type=int, default=300)
    args = ap.parse_args()
    if args.what == "prewarm-blocks":
        prewarm_blocks()
    else:
        pid_walks(args.procs)


if __name__ == "__main__":
    main()
