"""Phase transitions: the AC-1 sequence (phases 2 -> 3 -> 4) through the real daemon, against
the seed manager's method run on the same stand-ins in the same invocation.

    python -m bench.transitions [--rounds 5]
    python -m bench.transitions --profile real [...]   (bench/transitions_real.py: services
        whose cold start is many times longer than a wake; seed vs serial vs graph+sleep vs
        graph+sleep+prewarm)

Overhead = a transition's total minus what the services themselves take: each stopped
stand-in's exit, the simulated driver's release delay (500 ms), and each started stand-in's own
time from process creation to a healthy /health (it reports `ready_at`).
Baseline (what the seed's manager did): SIGTERM, wait for exit, sleep(2), start, a 1 s warm-up
wait, then poll /health every 1 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import pct, row, write
from tests.support.daemon import DaemonProc

SEQUENCE = [2, 3, 4]
# Stand-ins with known times: healthy 0.3 s after they start, 0.1 s to shut down, and the
# simulated driver's 500 ms release delay.
KNOWN = {f'"--startup-s", "{s}"': '"--startup-s", "0.3", "--stop-s", "0.1"'
         for s in ("1.5", "1.0", "0.5")}
RELEASE_DELAY_S = 0.5


def own_ready_s(port: int) -> float:
    """A stand-in's own start time: process creation to /health turning 200."""
    body = httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).json()
    return float(body["startup_total_s"])


def daemon_round(tmp: Path) -> list[dict[str, Any]]:
    d = DaemonProc(tmp, replace=KNOWN).start()
    results = []
    try:
        ports = {n: int(s["health"]["url"].rsplit(":", 1)[1].split("/")[0])
                 for n, s in _inventory_health(d).items()}
        for phase in SEQUENCE:
            t0 = time.monotonic()
            resp = d.post(f"/gpu/prepare-phase/{phase}")
            total = time.monotonic() - t0
            assert resp.status_code == 200, resp.text
            op = resp.json()["plan"]
            services_own = 0.0
            for step in op["steps"]:
                if step["action"] == "stop":
                    services_own += 0.1  # the stand-in's own shutdown (--stop-s)
                if step["action"] == "start":
                    services_own += own_ready_s(ports[step["service"]])
                    if step["reclaim_wait_s"]:
                        services_own += min(step["reclaim_wait_s"], RELEASE_DELAY_S)
            results.append({"phase": phase, "total_s": total, "own_s": services_own,
                            "overhead_s": total - services_own,
                            "steps": [(s["action"], s["service"], round(s["duration_s"], 3),
                                       s["reclaim_wait_s"]) for s in op["steps"]]})
    finally:
        d.close()
    return results


def _inventory_health(d: DaemonProc) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load((d.config_dir / "services.yaml").read_text())
    return {n: s for n, s in data["services"].items()}


def baseline_round(tmp: Path) -> list[dict[str, Any]]:
    """The seed's way: stop, sleep(2), start, warm-up, poll health every second."""
    d = DaemonProc(tmp, replace=KNOWN)  # only for the generated inventory (same stand-ins)
    inv = _inventory_health(d)
    env = {**os.environ, "GPU_MANAGER_SIM_DIR": str(tmp / "sim")}
    from gpu_manager.sim.registry import SimRegistry

    SimRegistry(tmp / "sim").write_gpu(24576, 500, 0)
    phases = {2: "vidi", 3: "cosyvoice", 4: "comfyui"}
    current: subprocess.Popen[bytes] | None = None
    results = []
    for phase in SEQUENCE:
        t0 = time.monotonic()
        if current is not None:
            current.send_signal(signal.SIGTERM)
            current.wait()
            time.sleep(2)  # the seed's "let VRAM be reclaimed"
        svc = inv[phases[phase]]
        cmd = [sys.executable if a == "{python}" else a for a in svc["command"]]
        current = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(1)  # warm-up wait before the first health check
        while True:
            try:
                if httpx.get(svc["health"]["url"], trust_env=False, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        results.append({"phase": phase, "total_s": time.monotonic() - t0})
    if current is not None:
        current.kill()
        current.wait()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=("known", "real"), default="known",
                    help="known: 0.3 s stand-ins, one per phase (this file); real: see "
                         "bench/transitions_real.py (its own options follow)")
    ap.add_argument("--rounds", type=int, default=None, help="[3; real: 2]")
    args, rest = ap.parse_known_args()
    if args.profile == "real":
        from bench import transitions_real

        rounds = [] if args.rounds is None else ["--rounds", str(args.rounds)]
        transitions_real.main([*rest, *rounds])
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rounds = 3 if args.rounds is None else args.rounds
    print("transitions: AC-1 (phases 2 -> 3 -> 4), gpu-manager vs the seed's stop/sleep/poll")
    ours: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
            ours += daemon_round(Path(tmp) / "d")
            base += baseline_round(Path(tmp) / "b")
        print(f"  round {i + 1}/{args.rounds} done")
    overheads = [r["overhead_s"] * 1000 for r in ours]
    seq_ours = sum(r["total_s"] for r in ours) / args.rounds
    seq_base = sum(r["total_s"] for r in base) / args.rounds
    for phase in SEQUENCE:
        mine = [r for r in ours if r["phase"] == phase]
        row(f"phase {phase}: total / services' own (mean)",
            f"{sum(r['total_s'] for r in mine) / len(mine):.3f} / "
            f"{sum(r['own_s'] for r in mine) / len(mine):.3f} s")
    row("transition overhead p50 / p95", f"{pct(overheads, 50):.0f} / {pct(overheads, 95):.0f} ms",
        "target: p95 <= 150 ms")
    row("AC-1 sequence: gpu-manager / baseline", f"{seq_ours:.2f} / {seq_base:.2f} s",
        f"speed-up {seq_base / seq_ours:.1f}x (target >= 3x)")
    path = write("transitions", {
        "rounds": args.rounds, "ours": ours, "baseline": base,
        "overhead_ms_p50": pct(overheads, 50), "overhead_ms_p95": pct(overheads, 95),
        "sequence_s_ours": seq_ours, "sequence_s_baseline": seq_base,
        "speedup": seq_base / seq_ours,
    })
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
