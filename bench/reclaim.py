"""Reclaim detection: from a stand-in's exit to the poller (fast mode) seeing its VRAM back.

    python -m bench.reclaim [--rounds 15]

Target: no more than one fast-poll interval + 20 ms beyond the simulated release delay.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import pct, row, write
from gpu_manager.probe import Poller, SimulatedProbe

RELEASE_MS = 500
FAST_S = 0.1


async def rounds(n: int, sim: Path) -> list[float]:
    probe = SimulatedProbe(sim, 24576, release_delay_ms=RELEASE_MS)
    poller = Poller(probe, interval_s=1.0, fast_interval_s=FAST_S)
    await poller.start()
    beyond: list[float] = []
    try:
        for i in range(n):
            proc = subprocess.Popen(  # noqa: ASYNC220 - started, then waited on in a thread
                [sys.executable, "-m", "gpu_manager.sim.workload", "--vram-mb", "2000",
                 "--port", "0", "--name", f"r{i}"],
                env={**os.environ, "GPU_MANAGER_SIM_DIR": str(sim)}, stdout=subprocess.DEVNULL)
            seen = await poller.wait_until(
                lambda s, pid=proc.pid: s.devices[0].process(pid) is not None, 20)
            assert seen is not None, "the stand-in never registered"
            async with poller.fast():
                proc.send_signal(signal.SIGKILL if i % 2 else signal.SIGTERM)
                await asyncio.to_thread(proc.wait)
                exited = time.monotonic()
                back = await poller.wait_until(
                    lambda s, pid=proc.pid: s.devices[0].process(pid) is None, 10)
                assert back is not None
                beyond.append((time.monotonic() - exited - RELEASE_MS / 1000) * 1000)
    finally:
        await poller.stop()
    return beyond


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=16)
    args = ap.parse_args()
    print("reclaim detection: exit -> VRAM seen back, beyond the 500 ms release delay")
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        beyond = asyncio.run(rounds(args.rounds, Path(tmp) / "sim"))
    target = FAST_S * 1000 + 20
    row("beyond the release delay p50 / p95 / max",
        f"{pct(beyond, 50):.0f} / {pct(beyond, 95):.0f} / {max(beyond):.0f} ms",
        f"target: <= {target:.0f} ms (one fast poll + 20 ms)")
    path = write("reclaim", {"rounds": args.rounds, "beyond_ms": beyond, "target_ms": target,
                             "p50_ms": pct(beyond, 50), "p95_ms": pct(beyond, 95)})
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
