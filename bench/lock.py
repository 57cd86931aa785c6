"""The Redis GPU lock on loopback: acquire+release latency, hand-off to a waiter, take-over
after a holder is killed.

    python -m bench.lock
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import pct, row, write
from gpu_manager.lock import RedisLock
from tests.support.env import RedisServer

TTL_MS = 1000
HOLDER = """
import asyncio, sys
from gpu_manager.lock import RedisLock
async def main():
    lock = RedisLock(sys.argv[1], ttl_ms=int(sys.argv[2]))
    await lock.acquire("victim")
    print("held", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def run(url: str) -> dict[str, object]:
    lock = RedisLock(url, ttl_ms=TTL_MS)
    cycle: list[float] = []
    for _ in range(2000):
        t0 = time.perf_counter()
        lease = await lock.acquire("bench")
        await lease.release()
        cycle.append((time.perf_counter() - t0) * 1000)
    handoff: list[float] = []
    for _ in range(20):
        holder = await lock.acquire("holder")
        waiter = asyncio.create_task(lock.acquire("waiter", wait_s=5))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await holder.release()
        lease = await waiter
        handoff.append((time.perf_counter() - t0) * 1000)
        await lease.release()
    takeover: list[float] = []
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(TTL_MS)],  # noqa: ASYNC220
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "held"
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        t0 = time.perf_counter()
        lease = await lock.acquire("survivor", wait_s=TTL_MS / 1000 + 5)
        takeover.append((time.perf_counter() - t0) * 1000)
        await lease.release()
    await lock.close()
    return {"cycle": cycle, "handoff": handoff, "takeover": takeover}


def main() -> None:
    print("Redis lock on loopback")
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        server = RedisServer(Path(tmp))
        try:
            res = asyncio.run(run(server.url))
        finally:
            server.stop()
    c, h, t = res["cycle"], res["handoff"], res["takeover"]
    assert isinstance(c, list) and isinstance(h, list) and isinstance(t, list)
    row("acquire+release p50 / p99", f"{pct(c, 50):.3f} / {pct(c, 99):.3f} ms",
        "target: p99 <= 1 ms")
    row("hand-off to a waiter p50 / max", f"{pct(h, 50):.1f} / {max(h):.1f} ms",
        "target: <= 20 ms")
    row("take-over after kill -9, max", f"{max(t):.0f} ms",
        f"target: <= TTL + 200 = {TTL_MS + 200} ms")
    path = write("lock", {"ttl_ms": TTL_MS, "cycle_p50_ms": pct(c, 50),
                          "cycle_p99_ms": pct(c, 99), "handoff_ms": h, "takeover_ms": t})
    print(f"  -> {path}")


if __name__ == "__main__":
    main()
