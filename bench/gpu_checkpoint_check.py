"""Real-GPU check of `cuda-checkpoint` (issue 24): run by hand on a machine with an NVIDIA GPU,
driver >= 570 (CUDA 12.8) and torch.

    python -m bench.gpu_checkpoint_check [--sizes-gb 2 8 32] [--device 0]

For each size: a torch process fills a tensor of that many GB with a known pattern and
reports its checksum; the daemon's checkpoint layer (gpu_manager/checkpoint, libcuda via
ctypes) checkpoints it (NVML must show its memory gone while the process lives), then
restores it (NVML: the memory back) and the process recomputes the checksum, which must be
equal. Times for each step, and the process's RSS before and after the checkpoint (what the
host RAM budget will count). Nothing here is claimed until it has run: docs/gpu-validation.md
records only measured figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import psutil

from bench.common import row, write
from gpu_manager.checkpoint import ProcessState
from gpu_manager.checkpoint.libcuda import LibcudaCheckpointer
from gpu_manager.probe.nvml import NvmlProbe

# The child: fill N GB with a pattern, print its checksum, then on each line of stdin
# print the checksum again (which blocks in CUDA while checkpointed, as it must).
CHILD = r"""
import sys, torch
gb = float(sys.argv[1]); dev = int(sys.argv[2])
n = int(gb * (1 << 30) // 4)
t = torch.arange(n, dtype=torch.float32, device=f"cuda:{dev}").remainder_(1000.0)
torch.cuda.synchronize(dev)
print(float(t.double().sum()), flush=True)
for _ in sys.stdin:
    print(float(t.double().sum()), flush=True)
"""


def held_mb(probe: NvmlProbe, device: int, pid: int) -> int | None:
    snap = probe.sample(processes=True)
    dev = snap.device(device)
    proc = dev.process(pid) if dev is not None else None
    return None if proc is None else proc.used_mb


async def one(cp: LibcudaCheckpointer, probe: NvmlProbe, gb: float,
              device: int) -> dict[str, Any]:
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(gb), str(device)],  # noqa: ASYNC220
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        first = float(child.stdout.readline())
        loaded = time.monotonic() - t0
        before_mb = held_mb(probe, device, child.pid)
        rss_before = psutil.Process(child.pid).memory_info().rss >> 20
        timeout = max(60.0, gb * 10)
        t = time.monotonic()
        ck = await cp.checkpoint([child.pid], timeout)
        checkpoint_s = time.monotonic() - t
        assert ck.ok, ck
        assert await cp.state(child.pid) is ProcessState.CHECKPOINTED
        asleep_mb = held_mb(probe, device, child.pid)
        alive = child.poll() is None
        rss_asleep = psutil.Process(child.pid).memory_info().rss >> 20
        t = time.monotonic()
        rs = await cp.restore([child.pid], timeout)
        restore_s = time.monotonic() - t
        assert rs.ok, rs
        child.stdin.write("again\n")
        child.stdin.flush()
        second = float(child.stdout.readline())
        out = {"gb": gb, "load_s": round(loaded, 3), "held_mb": before_mb,
               "checkpoint_s": round(checkpoint_s, 3), "held_checkpointed_mb": asleep_mb,
               "alive_checkpointed": alive, "rss_before_mb": rss_before,
               "rss_checkpointed_mb": rss_asleep, "restore_s": round(restore_s, 3),
               "held_restored_mb": held_mb(probe, device, child.pid),
               "checksum_equal": first == second}
        row(f"{gb:g} GB: checkpoint / restore (s)", f"{checkpoint_s:.2f} / {restore_s:.2f}")
        row(f"{gb:g} GB: VRAM held before / checkpointed / restored (MB)",
            f"{before_mb} / {asleep_mb} / {out['held_restored_mb']}")
        row(f"{gb:g} GB: RSS before / checkpointed (MB)", f"{rss_before} / {rss_asleep}")
        row(f"{gb:g} GB: checksum equal after restore", str(out["checksum_equal"]))
        return out
    finally:
        child.kill()
        child.wait(30)


async def run(sizes: list[float], device: int) -> dict[str, Any]:
    cp = LibcudaCheckpointer()
    cap = await cp.capability()
    row("capability", f"{cap.capable} ({cap.driver}; {cap.reason or 'ok'})")
    if not cap.capable:
        return {"capability": cap.reason, "sizes": []}
    probe = NvmlProbe()
    probe.init()
    try:
        return {"capability": cap.driver, "pid": os.getpid(),
                "sizes": [await one(cp, probe, gb, device) for gb in sizes]}
    finally:
        probe.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[2.0, 8.0, 32.0])
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args()
    result = asyncio.run(run(args.sizes_gb, args.device))
    print(f"  -> {write('gpu_checkpoint_check', result)}")


if __name__ == "__main__":
    main()
