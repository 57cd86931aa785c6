"""Phase transitions with services that look like real ones: a cold start many times longer than
a wake (3 s cold / 0.3 s wake / 0.1-0.2 s sleep, times `--scale`), four ways side by side.

    python -m bench.transitions --profile real [--rounds 2] [--scale 0.5]
    python -m bench.transitions_real ...           (the same)

Sequences: AC-1 (phases 2 -> 3 -> 4) and a back-and-forth (2 -> 3 -> 2 -> 3), each from an
empty GPU, every prepare-phase call measured (the first one enters phase 2 from nothing).
Modes, on the same stand-ins (`gpu_manager.sim.workload --api vllm|sglang|comfyui`):
  (a) seed:    no daemon; the seed's script: SIGTERM what the phase does not need, wait for
               it to exit, sleep(2), then per service: start, sleep(1), poll /health every 1 s
  (b) serial:  the daemon, GPU_MANAGER_PLAN_MODE=serial, no `sleep:` blocks (stop, then start
               one step after another: the behaviour before the graph)
  (c) graph:   the daemon, graph plans, `sleep:` blocks, no prewarm
  (d) prewarm: as (c), plus `prewarm: true` and `next:` links (AC-1: 2->3, 3->4; back-and-forth:
               2->3, 3->2)
Between two calls the bench spends `--dwell` seconds in the phase (the pipeline's work); in (d)
also until the prewarm the call set off has ended (bounded), as a phase that lasts a while
would let it. That time is not counted.

Per call: wall time (POST /gpu/prepare-phase/N, waited for) against
- own: the services' own minimum, the slowest start or wake the call cannot avoid (a start's
  own time is the stand-in's process creation to a healthy /health, interpreter included, as
  it reports it; a wake's is --wake-s); 0 when everything the phase needs was ready
  (prewarmed);
- floor: what a manager with no overhead and the daemon's semantics would take: a start or
  wake that needs a release's VRAM comes after that release's own time (a sleep's --sleep-s;
  a stop's --stop-s plus the simulated driver's release delay), and the answer comes once
  every step is done (releases nobody waits for included).
Gap = wall - own, overhead = wall - floor; p50/p95 per mode and sequence.

Targets (issue 12, item 5), checked and printed, never asserted (benchmarks are not tests):
(c) p95 of wall - own <= 150 ms; (d) a call whose services were all prewarmed answers in
<= 150 ms; the back-and-forth >= 5x faster than (a).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import write
from bench.transitions_report import (
    MODES,
    NEXT,
    SEQUENCES,
    report,
    summarize,
)
from bench.transitions_setup import (
    BY_NAME,
    PHASES,
    RELEASE_DELAY_MS,
    RESERVE_MB,
    RESIDUAL_MB,
    SERVICES,
    TOTAL_MB,
    Setup,
    minimums,
    phases_yaml,
    services_yaml,
)
from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import DaemonProc
from tests.support.env import free_port


def prewarm_ops(d: DaemonProc) -> list[dict[str, Any]]:
    ops = d.get("/gpu/operations", params={"limit": 200}).json()["operations"]
    return [op for op in ops if op["request"]["kind"] == "Prewarm"]


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def settle(d: DaemonProc, setup: Setup, prewarms: int) -> bool:
    """Nothing in flight, and the first `prewarms` prewarm operations ended (bounded: the
    slowest cold start twice over, plus 10 s); False when the bound ran out."""
    bound = 2 * setup.t(max(s.cold_s for s in SERVICES)) + 10

    def done() -> bool:
        if d.status()["operations"]:
            return False
        ended = [op for op in prewarm_ops(d) if op["status"] not in ("queued", "running")]
        return len(ended) >= prewarms

    return wait_until(done, bound)


def mismatches(d: DaemonProc) -> list[str]:
    """Where the daemon's word and the simulated GPU disagree: a service it calls ready that
    holds no more than its residual (asleep), or one it calls sleeping that holds more. Such
    a call's figures are not to be trusted (the daemon skipped a wake or a sleep)."""
    held: dict[int, int] = {r.pid: r.mb for r in SimRegistry(d.sim_dir).active()}
    out = []
    for name, svc in d.status()["services"].items():
        mb = sum(held.get(pid, 0) for pid in svc["pids"])
        if svc["state"] == "ready" and mb <= RESIDUAL_MB and BY_NAME[name].api != "comfyui":
            out.append(f"{name}: ready, but holds {mb} MB (asleep)")
        elif svc["state"] == "sleeping" and mb > RESIDUAL_MB:
            out.append(f"{name}: sleeping, but holds {mb} MB")
    return out


def daemon_sequence(tmp: Path, setup: Setup, mode: str, seq: str) -> list[dict[str, Any]]:
    env = {"GPU_MANAGER_PLAN_MODE": "serial" if mode == "b" else "graph"}
    d = DaemonProc(tmp, env=env)
    (d.config_dir / "services.yaml").write_text(
        services_yaml(setup, sleep=mode in "cd", prewarm=mode == "d"))
    (d.config_dir / "phases.yaml").write_text(phases_yaml(NEXT[seq] if mode == "d" else {}))
    d.start()
    out: list[dict[str, Any]] = []
    prewarms = 0
    try:
        previous: int | None = None
        for i, phase in enumerate(SEQUENCES[seq]):
            status = d.status()
            wanted = PHASES[phase][1]
            prewarmed = sorted(n for n in wanted if n in status["prewarmed"]
                               and status["services"][n]["state"] == "ready")
            t0, t0_wall = time.monotonic(), time.time()
            resp = d.post(f"/gpu/prepare-phase/{phase}")
            wall = time.monotonic() - t0
            if resp.status_code != 200:
                raise RuntimeError(f"({mode}) prepare-phase/{phase}: {resp.status_code} "
                                   f"{resp.text[:500]}\n{d.log_text()}")
            op = resp.json()["plan"]
            steps = op["steps"]
            own, floor = minimums(setup, steps)
            out.append({
                "mode": mode, "sequence": seq, "index": i, "from": previous, "to": phase,
                "wall_s": wall, "own_s": own, "floor_s": floor, "prewarmed": prewarmed,
                "all_prewarmed": len(prewarmed) == len(wanted),
                "op_duration_s": op["duration_s"],
                # when the daemon began the operation and each step, and when it ended, in
                # seconds after the request was sent (the clock is the same machine's)
                "op_began_s": op["started_at"] - t0_wall,
                "op_ended_s": op["finished_at"] - t0_wall,
                "steps": [{**{k: s[k] for k in ("action", "service", "after", "duration_s",
                                                "reclaim_wait_s", "detail")},
                           "began_s": s["started_at"] - t0_wall if s["started_at"] else None}
                          for s in steps],
            })
            out[-1].update(split_overhead(out[-1]))
            out[-1]["mismatches"] = mismatches(d)
            previous = phase
            if mode == "d" and phase in NEXT[seq]:
                prewarms += 1
            out[-1]["settled"] = settle(d, setup, prewarms)
            out[-1]["mismatches"] += [f"after settling: {m}" for m in mismatches(d)]
            if mode == "d" and phase in NEXT[seq]:
                last = prewarm_ops(d)[-1]
                out[-1]["prewarm_after"] = {
                    "status": last["status"], "duration_s": last["duration_s"],
                    "steps": [(s["action"], s["service"]) for s in last["steps"]]}
            time.sleep(setup.dwell_s)
    finally:
        d.close()
    return out


def split_overhead(rec: dict[str, Any]) -> dict[str, float]:
    """Where wall - floor went: before the first step began (HTTP in, the queue, the GPU lock,
    the pid refresh, the plan), inside the steps beyond the services' own times, and after
    the last step ended (a fresh poll, pid refreshes, the lock dropped, HTTP out)."""
    steps = [s for s in rec["steps"] if s["began_s"] is not None]
    if not steps:
        return {"before_steps_s": rec["wall_s"], "in_steps_s": 0.0, "after_steps_s": 0.0}
    first = min(s["began_s"] for s in steps)
    last = max(s["began_s"] + (s["duration_s"] or 0.0) for s in steps)
    return {"before_steps_s": first, "after_steps_s": rec["wall_s"] - last,
            "in_steps_s": last - first - rec["floor_s"]}


# -- (a): the seed's script, no daemon ------------------------------------------------------------
def seed_sequence(tmp: Path, setup: Setup, seq: str) -> list[dict[str, Any]]:
    sim = tmp / "sim"
    registry = SimRegistry(sim)
    registry.write_gpu(TOTAL_MB, RELEASE_DELAY_MS, 0)
    env = {**os.environ, "GPU_MANAGER_SIM_DIR": str(sim)}
    running: dict[str, subprocess.Popen[bytes]] = {}
    out: list[dict[str, Any]] = []
    client = httpx.Client(trust_env=False, timeout=2)
    # The simulated driver's release delay runs from when a death is first seen; with no
    # daemon polling, something must look, as a real driver tears down on its own.
    watching = threading.Event()
    watcher = threading.Thread(target=_watch_registry, args=(registry, watching), daemon=True)
    watcher.start()
    try:
        previous: int | None = None
        for i, phase in enumerate(SEQUENCES[seq]):
            wanted = PHASES[phase][1]
            stops = [n for n in running if n not in wanted]
            starts = [n for n in wanted if n not in running]
            # the plan a zero-overhead manager would follow, for own/floor: a start needs the
            # stops' VRAM when it does not fit beside everything running before
            free = TOTAL_MB - RESERVE_MB - sum(BY_NAME[n].vram_mb for n in running)
            steps: list[dict[str, Any]] = [{"action": "stop", "service": n, "after": []}
                                           for n in stops]
            for n in starts:
                free -= BY_NAME[n].vram_mb
                steps.append({"action": "start", "service": n,
                              "after": list(range(len(stops))) if free < 0 else []})
            t0 = time.monotonic()
            for n in stops:
                proc = running.pop(n)
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            if stops:
                time.sleep(2)  # the seed's "let VRAM be reclaimed"
            for n in starts:
                cmd = [sys.executable if a == "{python}" else a
                       for a in setup.command(BY_NAME[n])]
                running[n] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
                time.sleep(1)  # warm-up wait before the first health check
                _poll_every_second(client, setup.health_url(n), running[n])
            wall = time.monotonic() - t0
            own, floor = minimums(setup, steps)
            out.append({"mode": "a", "sequence": seq, "index": i, "from": previous,
                        "to": phase, "wall_s": wall, "own_s": own, "floor_s": floor,
                        "prewarmed": [], "all_prewarmed": False,
                        "steps": [{"action": s["action"], "service": s["service"]}
                                  for s in steps]})
            previous = phase
            time.sleep(setup.dwell_s)
    finally:
        watching.set()
        watcher.join(5)
        client.close()
        for proc in running.values():
            proc.kill()
            proc.wait()
    return out


def _watch_registry(registry: SimRegistry, done: threading.Event) -> None:
    while not done.wait(0.02):
        registry.active()


def _poll_every_second(client: httpx.Client, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"(a) {url}: the stand-in exited {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if client.get(url).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"(a) {url}: not healthy within 120 s")


# -- report ---------------------------------------------------------------------------------------
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.transitions --profile real")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.5,
                    help="multiplies every service time (3 s cold, 0.3 s wake, ...) [0.5]")
    ap.add_argument("--modes", default="abcd", help="which of a, b, c, d to run [abcd]")
    ap.add_argument("--sequences", default="ac1,bf", help="ac1, bf or both [ac1,bf]")
    ap.add_argument("--fast-poll", type=float, default=0.1,
                    help="gpu.fast_poll_interval_s of the daemon [0.1, its default]")
    ap.add_argument("--health-interval", type=float, default=0.05,
                    help="health.startup_interval_s of every service [0.05, its default]")
    ap.add_argument("--dwell", type=float, default=0.3,
                    help="seconds spent in each phase between calls, not counted [0.3]")
    ap.add_argument("--host-procs", type=int, default=0,
                    help="idle processes to add to the host for the run (a desktop or a GPU "
                         "server runs hundreds; this container ~80) [0]")
    ap.add_argument("--out", default="transitions_real", help="bench/results/NAME.json")
    return ap.parse_args(argv)


@contextlib.contextmanager
def idle_processes(n: int) -> Iterator[int]:
    """`n` more (sleeping) processes on the host while inside; yields the host's count."""
    procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(n)]
    try:
        yield len(psutil.pids())
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def run_rounds(args: argparse.Namespace, modes: list[str], seqs: list[str],
               t0: float) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for i in range(args.rounds):
        for seq in seqs:
            for mode in modes:
                ports = {s.name: free_port() for s in SERVICES}
                setup = Setup(args.scale, ports, args.fast_poll, args.health_interval,
                              args.dwell)
                with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
                    if mode == "a":
                        records += seed_sequence(Path(tmp), setup, seq)
                    else:
                        records += daemon_sequence(Path(tmp), setup, mode, seq)
        print(f"  round {i + 1}/{args.rounds} done ({time.monotonic() - t0:.0f} s)")
    return records


def main(argv: list[str] | None = None,
         prog: str = "python -m bench.transitions --profile real") -> None:
    args = parse(argv)
    modes = [m for m in MODES if m in args.modes]
    seqs = [s for s in args.sequences.split(",") if s in SEQUENCES]
    print(f"transitions, real-looking profile (scale {args.scale:g}: cold "
          f"{3 * args.scale:g} s, wake {0.3 * args.scale:g} s), modes {''.join(modes)}, "
          f"{args.rounds} round(s)")
    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        print(f"  note: load average {load_before[0]:.2f} before the run: something else "
              "shares the machine, the figures will be noisy")
    t0 = time.monotonic()
    with idle_processes(args.host_procs) as host_procs:
        records = run_rounds(args, modes, seqs, t0)
    summary = summarize(records, args.rounds)
    report(summary)
    path = write(args.out, {
        "command": f"{prog} " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "rounds": args.rounds, "scale": args.scale, "fast_poll_s": args.fast_poll,
        "health_interval_s": args.health_interval, "seconds": time.monotonic() - t0,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "host_processes": host_procs,
        "dwell_s": args.dwell, "services": [asdict(s) for s in SERVICES],
        **summary, "records": records,
    })
    print(f"  -> {path}  ({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
