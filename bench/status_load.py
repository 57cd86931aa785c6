"""GET /gpu/status under open-loop load while the poller runs, against a bare FastAPI endpoint
returning the same JSON in the same run.

    python -m bench.status_load [--rate 500] [--seconds 10]

The simulated probe is given NVML-like costs: 5 ms per poll, plus one 100 ms poll per second,
polling every 100 ms (fast mode's cadence, the worst case).

The daemon sends a body built once per change of what it shows (api/status_cache.py); the
bare endpoint serialises its payload per request. That the cached body keeps up is measured
too: the age of the snapshot each read shows (now - `vram.updated_at`), under load, which
is the poller's cadence when the cache follows every new snapshot, and grows when it does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import pct, row, write
from bench.loadgen import closed_loop, open_loop, request
from tests.support.daemon import DaemonProc
from tests.support.env import free_port, wait_for

COSTS = {"  device: 0\n": "  device: 0\n  simulated_poll_cost_ms: 5\n"
         "  simulated_slow_poll_ms: 100\n  poll_interval_s: 0.1\n  process_poll_interval_s: 0.1\n"}


def measure(port: int, rate: float, seconds: float) -> dict[str, Any]:
    closed = asyncio.run(closed_loop("127.0.0.1", port, "/gpu/status", 5))
    opened = asyncio.run(open_loop("127.0.0.1", port, "/gpu/status", rate, seconds))
    return {"closed_loop": closed, "open_loop": opened}


async def ages(port: int, seconds: float) -> dict[str, Any]:
    """The age of the snapshot each read of the status shows, read every 10 ms on a
    connection of its own while a closed loop loads the daemon."""
    load = asyncio.create_task(closed_loop("127.0.0.1", port, "/gpu/status", seconds))
    conn = await asyncio.open_connection("127.0.0.1", port)
    seen: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        _, body = await request(conn, "127.0.0.1", "GET", "/gpu/status")
        seen.append((time.time() - json.loads(body)["vram"]["updated_at"]) * 1000)
        await asyncio.sleep(0.01)
    conn[1].close()
    await load
    return {"samples": len(seen), "p50_ms": pct(seen, 50), "p99_ms": pct(seen, 99),
            "max_ms": max(seen)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    print(f"status under load: {args.rate:g} req/s open loop, poller at 5 ms/poll + 100 ms/s")
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        d = DaemonProc(Path(tmp), replace=COSTS).start()
        bare: subprocess.Popen[bytes] | None = None
        try:
            assert d.post("/gpu/prepare-phase/2").status_code == 200
            body = d.get("/gpu/status").content
            payload = Path(tmp) / "payload.json"
            payload.write_bytes(body)
            port = free_port()
            bare = subprocess.Popen([sys.executable, "-m", "bench.bare_server", str(port),
                                     str(payload)])
            wait_for(lambda: _up(port), 30, "the bare server")
            assert d.proc is not None
            proc = psutil.Process(d.proc.pid)
            rss_idle = proc.memory_info().rss / 2**20
            base = measure(port, args.rate, args.seconds)
            ours = measure(d.port, args.rate, args.seconds)
            age = asyncio.run(ages(d.port, 3))
            rss_load = proc.memory_info().rss / 2**20
            polls = d.get("/metrics").text.count("gpu_manager_probe_errors")
        finally:
            if bare is not None:
                bare.kill()
                bare.wait()
            d.close()
    ratio = ours["closed_loop"]["rps"] / base["closed_loop"]["rps"]
    o, b = ours["open_loop"], base["open_loop"]
    row("payload", f"{len(body)} bytes")
    row("bare FastAPI: p50 / p99 at rate", f"{b['p50_ms']:.2f} / {b['p99_ms']:.2f} ms")
    row("gpu-manager: p50 / p99 at rate", f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f} ms",
        "target: p99 <= 5 ms")
    row("errors (ours / bare)", f"{o['errors']} / {b['errors']}")
    row("max throughput: gpu-manager / bare", f"{ours['closed_loop']['rps']:.0f} / "
        f"{base['closed_loop']['rps']:.0f} req/s", f"{ratio:.0%} (target >= 60%)")
    row("status snapshot age under load: p50 / max",
        f"{age['p50_ms']:.0f} / {age['max_ms']:.0f} ms", "polls every 100 ms (+ 100 ms/s)")
    row("daemon RSS idle / under load", f"{rss_idle:.0f} / {rss_load:.0f} MB",
        "target: <= 100 MB")
    path = write("status_load", {"rate": args.rate, "seconds": args.seconds,
                                 "payload_bytes": len(body), "ours": ours, "bare": base,
                                 "throughput_ratio": ratio, "status_age": age,
                                 "rss_idle_mb": rss_idle,
                                 "rss_load_mb": rss_load, "metrics_seen": polls > 0})
    print(f"  -> {path}")


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/gpu/status", trust_env=False).is_success
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
