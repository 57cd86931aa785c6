"""Cold start to /ready, and resident memory when idle.

    python -m bench.footprint [--runs 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import pct, row, write
from tests.support.daemon import DaemonProc


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
    row("cold start to /ready p50 / max", f"{pct(starts, 50):.2f} / {max(starts):.2f} s",
        "target: <= 1.5 s")
    row("RSS idle p50", f"{pct(rss, 50):.0f} MB", "target: <= 100 MB")
    print(f"  -> {write('footprint', {'start_s': starts, 'rss_idle_mb': rss})}")


if __name__ == "__main__":
    main()
