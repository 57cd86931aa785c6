"""Run gpu-manager's real NVML probe in a subprocess (LD_LIBRARY_PATH points at the stub).

Reads commands from stdin, one a line, answers one JSON line each:
  select TOTAL_MB        make_probe(backend=auto): which probe, and its error if degraded
  sample | sample-mem    a snapshot with / without process lists
  poll-reads N           start a Poller, read `latest` and can_fit N times, report the polls
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from loguru import logger

from gpu_manager.config import GpuConfig
from gpu_manager.probe import Poller, make_probe
from gpu_manager.probe.nvml import NvmlProbe

warnings: list[str] = []
logger.remove()
logger.add(lambda m: warnings.append(str(m).strip()), level="WARNING", format="{message}")


def emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


async def poll_reads(probe: Any, n: int) -> dict[str, Any]:
    poller = Poller(probe, interval_s=30, process_interval_s=30)
    await poller.start()
    polls_before = poller.polls
    fits = [poller.can_fit(1000) for _ in range(n)]
    latest = [poller.latest.taken_at for _ in range(n)]
    result = {"polls": poller.polls - polls_before, "fits": sorted(set(map(str, fits))),
              "distinct_snapshots": len(set(latest))}
    await poller.stop()
    return result


def main() -> None:
    probe: Any = None
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "select":
                probe = make_probe(GpuConfig(backend="auto", total_mb=int(args[0])), Path("/nope"))
                emit({"probe": type(probe).__name__, "error": getattr(probe, "reason", None),
                      "warnings": warnings})
            elif cmd in ("sample", "sample-mem"):
                probe = probe or NvmlProbe()
                snap = probe.sample(processes=cmd == "sample")
                emit({"snapshot": dataclasses.asdict(snap), "warnings": warnings})
            elif cmd == "poll-reads":
                probe = probe or NvmlProbe()
                emit(asyncio.run(poll_reads(probe, int(args[0]))))
            else:
                emit({"error": f"unknown command {cmd}"})
        except Exception as exc:
            emit({"exception": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
