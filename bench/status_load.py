"""GET /gpu/status under open-loop load while the poller runs, against a bare FastAPI endpoint
returning the same JSON in the same run.

    python -m bench.status_load [--rate 500] [--seconds 10]

The simulated probe is given NVML-like costs: 5 ms per poll, plus one 100 ms poll per second,
polling every 100 ms (fast mode's cadence, the worst case).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import row, write
from bench.loadgen import closed_loop, open_loop
from tests.support.daemon import DaemonProc
from tests.support.env import free_port, wait_for

COSTS = {"  device: 0\n": "  device: 0\n  simulated_poll_cost_ms: 5\n"
         "  simulated_slow_poll_ms: 100\n  poll_interval_s: 0.1\n  process_poll_interval_s: 0.1\n"}


def measure(port: int, rate: float, seconds: float) -> dict[str, Any]:
    closed = asyncio.run(closed_loop("127.0.0.1", port, "/gpu/status", 5))
    opened = asyncio.run(open_loop("127.0.0.1", port, "/gpu/status", rate, seconds))
    return {"closed_loop": closed, "open_loop": opened}


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
    row("daemon RSS idle / under load", f"{rss_idle:.0f} / {rss_load:.0f} MB",
        "target: <= 100 MB")
    path = write("status_load", {"rate": args.rate, "seconds": args.seconds,
                                 "payload_bytes": len(body), "ours": ours, "bare": base,
                                 "throughput_ratio": ratio, "rss_idle_mb": rss_idle,
                                 "rss_load_mb": rss_load, "metrics_seen": polls > 0})
    print(f"  -> {path}")


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/gpu/status", trust_env=False).is_success
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
