"""Cold start to /ready, and resident memory when idle.

    python -m bench.footprint [--runs 5]

The floors, measured in the same run: starting Python, and importing FastAPI and uvicorn
(what any daemon on this stack pays before its own code); the start is reported as a ratio
to the second.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import pct, row, write
from tests.support.daemon import DaemonProc


def floor(code: str, runs: int) -> float:
    """p50 seconds of `python -c code` (a fresh interpreter each time, as systemd starts one)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return pct(times, 50)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print("footprint: cold start to /ready, idle RSS")
    starts, rss = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
            d = DaemonProc(Path(tmp))
            t0 = time.perf_counter()
            d.start()  # polls /ready every 10 ms from process spawn
            starts.append(time.perf_counter() - t0)
            assert d.proc is not None
            time.sleep(2)  # let it settle into its idle loop before reading its memory
            rss.append(psutil.Process(d.proc.pid).memory_info().rss / 2**20)
            d.close()
    python = floor("pass", args.runs)
    stack = floor("import fastapi, uvicorn", args.runs)
    p50 = pct(starts, 50)
    row("floor: python -c pass p50", f"{python:.2f} s", "")
    row("floor: import fastapi, uvicorn p50", f"{stack:.2f} s", "")
    row("cold start to /ready p50 / max", f"{p50:.2f} / {max(starts):.2f} s",
        f"target: <= 1.0 s ({'met' if p50 <= 1.0 else 'NOT met'})")
    row("cold start / import floor", f"{p50 / stack:.1f}x", "")
    row("RSS idle p50", f"{pct(rss, 50):.0f} MB", "target: <= 100 MB")
    data = {"start_s": starts, "rss_idle_mb": rss, "python_s": python,
            "fastapi_uvicorn_s": stack}
    print(f"  -> {write('footprint', data)}")


if __name__ == "__main__":
    main()
