"""Real-GPU check of the probe (issue: VRAM probe, item 7). Needs an NVIDIA GPU and torch/cupy.

    python -m bench.gpu_probe_check [--sizes 2048,8192] [--device 0]

For each size and each way of dying (SIGTERM, SIGKILL): start a `--cuda` stand-in, measure how
long until the NVML probe (fast poll, 100 ms) lists its pid with at least that much memory, then
kill it and measure how long until the pid is gone and free memory is back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from bench.common import row, write
from gpu_manager.probe import Poller
from gpu_manager.probe.nvml import NvmlProbe


async def one(
    poller: Poller, mb: int, sig: signal.Signals, device: int, port: int
) -> dict[str, float | str]:
    base = poller.latest.device(device)
    assert base is not None and base.free_mb is not None
    t0 = time.monotonic()
    # Started once and waited on in a thread: the blocking Popen costs the loop nothing here.
    cmd = [sys.executable, "-m", "gpu_manager.sim.workload", "--cuda", "--vram-mb", str(mb),
           "--device", str(device), "--port", str(port)]
    proc = subprocess.Popen(cmd)  # noqa: ASYNC220

    def holds(s) -> bool:  # type: ignore[no-untyped-def]
        d = s.device(device)
        p = d.process(proc.pid) if d else None
        return bool(p and p.used_mb is not None and p.used_mb >= mb)

    async with poller.fast():
        seen = await poller.wait_until(holds, 120)
        t_seen = time.monotonic() - t0
        assert seen is not None, "the probe never saw the allocation"
        os.kill(proc.pid, sig)
        t_kill = time.monotonic()
        await asyncio.to_thread(proc.wait)
        t_exit = time.monotonic() - t_kill

        def released(s) -> bool:  # type: ignore[no-untyped-def]
            d = s.device(device)
            return bool(d and d.process(proc.pid) is None and d.free_mb is not None
                        and d.free_mb >= base.free_mb - 256)

        gone = await poller.wait_until(released, 60)
        t_released = time.monotonic() - t_kill
    assert gone is not None, "memory did not come back within 60 s"
    return {"mb": mb, "signal": sig.name, "seen_after_start_s": round(t_seen, 3),
            "exit_after_signal_s": round(t_exit, 3),
            "released_after_signal_s": round(t_released, 3)}


async def main_async(sizes: list[int], device: int) -> list[dict[str, float | str]]:
    probe = NvmlProbe()
    probe.init()
    poller = Poller(probe, fast_interval_s=0.1)
    await poller.start()
    results = []
    try:
        for mb in sizes:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                r = await one(poller, mb, sig, device, 19700 + len(results))
                results.append(r)
                row(f"{mb} MB, {sig.name}: seen / released", f"{r['seen_after_start_s']} / "
                    f"{r['released_after_signal_s']} s")
    finally:
        await poller.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2048,8192")
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args()
    results = asyncio.run(main_async([int(s) for s in args.sizes.split(",")], args.device))
    print(f"  -> {write('gpu_probe_check', {'results': results})}")


if __name__ == "__main__":
    main()
