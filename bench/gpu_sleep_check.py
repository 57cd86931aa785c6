"""Real-GPU check of sleep and wake (issue 12): the `--cuda` stand-in speaking vLLM's API.

    python -m bench.gpu_sleep_check [--vram-mb 8192] [--residual-mb 512] [--rounds 3]

Starts `python -m gpu_manager.sim.workload --cuda --api vllm` (real CUDA allocations, freed
and `empty_cache`d on sleep), then per round: POST /sleep?level=1 (how long the answer
takes), how long until NVML shows the pid at <= residual + 64 MB and free memory back (the
reclaim the daemon waits for), POST /wake_up, and how long until NVML shows the model's
memory held again. A cold start (process creation to the first full allocation seen) is the
baseline these are compared against, in the same run. Needs an NVIDIA GPU and torch or cupy.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from typing import Any

import httpx

from bench.common import row, write
from gpu_manager.probe import Poller, Snapshot
from gpu_manager.probe.nvml import NvmlProbe

SLACK_MB = 64  # the CUDA context's own growth; NVML counts in MiB pages


def held(snap: Snapshot, device: int, pid: int) -> int | None:
    dev = snap.device(device)
    proc = dev.process(pid) if dev is not None else None
    return None if proc is None else proc.used_mb


async def run(vram: int, residual: int, rounds: int, device: int, port: int) -> dict[str, Any]:
    probe = NvmlProbe()
    probe.init()
    poller = Poller(probe, fast_interval_s=0.05)
    await poller.start()
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "gpu_manager.sim.workload", "--cuda",  # noqa: ASYNC220
                             "--api", "vllm", "--vram-mb", str(vram), "--sleep-vram-mb",
                             str(residual), "--device", str(device), "--port", str(port)])
    out: dict[str, Any] = {"vram_mb": vram, "residual_mb": residual, "rounds": []}
    try:
        async with poller.fast(), httpx.AsyncClient(trust_env=False, timeout=120) as http:
            full = await poller.wait_until(
                lambda s: (held(s, device, proc.pid) or 0) >= vram, 180)
            assert full is not None, "the probe never saw the allocation"
            out["cold_start_s"] = round(time.monotonic() - t0, 3)
            for _ in range(rounds):
                t = time.monotonic()
                r = await http.post(f"{base}/sleep", params={"level": 1})
                r.raise_for_status()
                answered = time.monotonic() - t
                down = await poller.wait_until(
                    lambda s: (held(s, device, proc.pid) or 0) <= residual + SLACK_MB, 60)
                assert down is not None, "the sleep did not free the memory within 60 s"
                reclaimed = time.monotonic() - t
                t = time.monotonic()
                r = await http.post(f"{base}/wake_up")
                r.raise_for_status()
                woke = time.monotonic() - t
                up = await poller.wait_until(
                    lambda s: (held(s, device, proc.pid) or 0) >= vram, 60)
                assert up is not None, "the wake did not take the memory back within 60 s"
                seen_up = time.monotonic() - t
                rec = {"sleep_answer_s": round(answered, 3), "reclaimed_s": round(reclaimed, 3),
                       "held_asleep_mb": held(down, device, proc.pid),
                       "wake_answer_s": round(woke, 3), "held_again_s": round(seen_up, 3)}
                out["rounds"].append(rec)
                row("sleep answered / reclaimed / wake / held again",
                    f"{answered:.3f} / {reclaimed:.3f} / {woke:.3f} / {seen_up:.3f} s")
    finally:
        proc.terminate()
        proc.wait(30)
        await poller.stop()
    best_wake = min(r["held_again_s"] for r in out["rounds"])
    row("cold start / fastest wake", f"{out['cold_start_s'] / max(best_wake, 1e-3):.1f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vram-mb", type=int, default=8192)
    ap.add_argument("--residual-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--port", type=int, default=19790)
    args = ap.parse_args()
    result = asyncio.run(run(args.vram_mb, args.residual_mb, args.rounds, args.device,
                             args.port))
    print(f"  -> {write('gpu_sleep_check', result)}")


if __name__ == "__main__":
    main()
