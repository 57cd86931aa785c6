"""Probe cost per poll and snapshot read latency (p50/p99).

    python -m bench.probe

- simulated probe with 8 live stand-in registrations: cost of one poll
- NVML probe against the stub driver library (when gcc is here): cost of one poll, with and
  without process lists; on a real GPU host run it with --real to use the real driver
- reading the latest snapshot / can_fit through the poller: what every request pays
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import pct, row, write
from gpu_manager.probe import Poller, SimulatedProbe
from gpu_manager.probe.model import GpuProbe

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "tests" / "nvml_stub" / "nvml_stub.c"


def time_polls(probe: GpuProbe, processes: bool, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        probe.sample(processes)
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def read_latency(probe: GpuProbe, n: int) -> list[float]:
    poller = Poller(probe, interval_s=0.05, process_interval_s=0.1)
    await poller.start()
    lat = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            snap = poller.latest
            poller.can_fit(1000)
            _ = snap.devices[0].free_mb
            lat.append((time.perf_counter() - t0) * 1e6)
            if i % 1000 == 0:
                await asyncio.sleep(0)  # let the poller publish meanwhile
    finally:
        await poller.stop()
    return lat


def simulated(n: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="gm-bench-"))
    probe = SimulatedProbe(tmp / "sim", total_mb=24576)
    env = {**os.environ, "GPU_MANAGER_SIM_DIR": str(probe.registry.root)}
    procs = [subprocess.Popen([sys.executable, "-m", "gpu_manager.sim.workload", "--vram-mb",
                               "100", "--port", str(19500 + i), "--name", f"b{i}"], env=env,
                              stdout=subprocess.DEVNULL) for i in range(8)]
    try:
        deadline = time.monotonic() + 30
        while len(probe.sample().devices[0].processes or ()) < 8:
            if time.monotonic() > deadline:
                raise RuntimeError("stand-ins did not register")
            time.sleep(0.05)
        polls = time_polls(probe, True, n)
        reads = asyncio.run(read_latency(probe, 200_000))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"poll_ms_p50": pct(polls, 50), "poll_ms_p99": pct(polls, 99),
            "read_us_p50": pct(reads, 50), "read_us_p99": pct(reads, 99)}


def nvml_in_subprocess(libdir: Path | None, n: int) -> dict[str, float] | None:
    code = f"""
import json, time
from gpu_manager.probe.nvml import NvmlProbe
from bench.probe import time_polls, pct
p = NvmlProbe(); p.init()
a = time_polls(p, True, {n}); b = time_polls(p, False, {n})
print(json.dumps({{"poll_ms_p50": pct(a, 50), "poll_ms_p99": pct(a, 99),
                  "mem_only_ms_p50": pct(b, 50), "mem_only_ms_p99": pct(b, 99)}}))
"""
    env = dict(os.environ)
    if libdir is not None:
        state = libdir / "state"
        state.write_text("init 0\ndevice 0 25769803776 21474836480 536870912 40 10\n"
                         "name 0 Stub GPU\nuuid 0 GPU-stub\n"
                         + "".join(f"proc 0 c {1000 + i} 1073741824\n" for i in range(8)))
        env.update(LD_LIBRARY_PATH=str(libdir), NVML_STUB_STATE=str(state))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=ROOT, check=False)
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    import json

    result: dict[str, float] = json.loads(res.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--polls", type=int, default=300)
    ap.add_argument("--real", action="store_true", help="use the real NVIDIA driver")
    args = ap.parse_args()
    print("probe: cost per poll and snapshot read latency")
    sim = simulated(args.polls)
    row("simulated poll (8 stand-ins) p50 / p99", f"{sim['poll_ms_p50']:.2f} / "
        f"{sim['poll_ms_p99']:.2f} ms")
    row("snapshot read + can_fit p50 / p99", f"{sim['read_us_p50']:.2f} / "
        f"{sim['read_us_p99']:.2f} us", "target: no probe call, << 100 ms (NFR-1)")
    result: dict[str, object] = {"simulated": sim}
    libdir: Path | None = None
    if not args.real and shutil.which("gcc"):
        libdir = Path(tempfile.mkdtemp(prefix="gm-nvml-"))
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(libdir / "libnvidia-ml.so.1"),
                        str(STUB)], check=True)
    if args.real or libdir is not None:
        nv = nvml_in_subprocess(libdir, args.polls)
        label = "real NVML" if args.real else "NVML via stub driver"
        if nv:
            row(f"{label} poll with processes p50 / p99",
                f"{nv['poll_ms_p50']:.3f} / {nv['poll_ms_p99']:.3f} ms")
            row(f"{label} memory-only poll p50 / p99",
                f"{nv['mem_only_ms_p50']:.3f} / {nv['mem_only_ms_p99']:.3f} ms")
            result["nvml_real" if args.real else "nvml_stub"] = nv
    print(f"  -> {write('probe', result)}")


if __name__ == "__main__":
    main()
