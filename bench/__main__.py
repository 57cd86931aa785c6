"""Run every benchmark: `python -m bench` (or `./dev bench`); `python -m bench NAME ...` for
some. bench.gpu_e2e and bench.gpu_probe_check need a real NVIDIA GPU and are run by hand."""

from __future__ import annotations

import importlib
import sys
import time

SCRIPTS = ["planner", "probe", "reclaim", "lock", "footprint", "status_load", "transitions",
           "transitions_real", "dashboard", "concurrency", "frontdoor", "fleet"]


def main() -> None:
    only = sys.argv[1:] or SCRIPTS
    t0 = time.monotonic()
    for name in only:
        print(f"\n== bench.{name}")
        module = importlib.import_module(f"bench.{name}")
        sys.argv = [f"bench.{name}"]
        module.main()
    print(f"\nall benchmarks done in {time.monotonic() - t0:.0f}s")
    importlib.import_module("bench.summary").main()


if __name__ == "__main__":
    main()
