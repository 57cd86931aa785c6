"""Many clients at once: what a real host's pipeline, operators and ML clients do together.

    python -m bench.concurrency [--clients 200] [--seconds 60] [--out concurrency]

`--clients` asyncio clients, each on its own keep-alive connection (plain HTTP/1.1 over
asyncio streams: an httpx client at this rate costs the load generator a whole core on 2
CPUs, and then it measures itself), loop for `--seconds`, each picking at random: read
`/gpu/status` (30 %), prepare phase 2, 3 or 4 (25 %), start (15 %) or stop (10 %) a service,
or acquire a client lease (20 %: 2000-6000 MB, `timeout_ms` 1000, released 0.2 s after it is
granted). The root inventory runs on the simulated GPU; a thread samples the simulated GPU
every 5 ms from outside the daemon.

Printed (and written to bench/results/<out>.json): answers that took over 30 s, the worst
answer of each kind, how late acquires answered beyond their own `timeout_ms` (p50, p99, max),
answers by status class (5xx must be 0), the most VRAM the GPU ever had in use against its
total (must never exceed it), and what an operator would see: requests answered per second.
To measure code of another commit with the same load, put its checkout first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from bench.common import pct, row, write
from bench.loadgen import request
from tests.support.daemon import DaemonProc, Sampler

SERVICES = ("vidi", "cosyvoice", "comfyui", "ollama")
ACQUIRE_TIMEOUT_MS = 1000
SLOW_S = 30.0


class Conn:
    """One keep-alive HTTP/1.1 connection: a request, then its whole answer."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.io: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      ) -> tuple[int, bytes]:
        if self.io is None:
            self.io = await asyncio.open_connection(self.host, self.port)
        try:
            return await request(self.io, self.host, method, path,
                                 json.dumps(body).encode() if body is not None else None)
        except (OSError, asyncio.IncompleteReadError):
            self.io[1].close()
            self.io = None
            raise

    def close(self) -> None:
        if self.io is not None:
            self.io[1].close()


async def client(conn: Conn, stop_at: float, rng: random.Random,
                 out: list[tuple[str, float, int, float]]) -> None:
    """One client's loop: (kind, seconds, status, seconds late beyond its own timeout)."""
    while time.monotonic() < stop_at:
        pick = rng.random()
        t0 = time.monotonic()
        late = 0.0
        try:
            if pick < 0.30:
                kind, (code, _) = "status", await conn.request("GET", "/gpu/status")
            elif pick < 0.55:
                kind = "phase"
                code, _ = await conn.request("POST",
                                             f"/gpu/prepare-phase/{rng.choice((2, 3, 4))}")
            elif pick < 0.70:
                kind = "start"
                code, _ = await conn.request(
                    "POST", f"/gpu/service/{rng.choice(SERVICES)}/start")
            elif pick < 0.80:
                kind = "stop"
                code, _ = await conn.request(
                    "POST", f"/gpu/service/{rng.choice(SERVICES)}/stop")
            else:
                kind = "acquire"
                sid = f"bench-{uuid.uuid4().hex[:8]}"
                code, _ = await conn.request("POST", "/gpu/acquire", {
                    "session_id": sid, "requester": "bench", "priority": rng.choice((1, 2)),
                    "timeout_ms": ACQUIRE_TIMEOUT_MS, "vram_mb": rng.randrange(2000, 6001),
                    "ttl_s": 5})
                late = max(0.0, time.monotonic() - t0 - ACQUIRE_TIMEOUT_MS / 1000)
                if code == 200:
                    await asyncio.sleep(0.2)
                    await conn.request("POST", "/gpu/release", {"session_id": sid})
        except (OSError, asyncio.IncompleteReadError):
            kind, code = "transport", 0
        out.append((kind, time.monotonic() - t0, code, late))
        await asyncio.sleep(rng.random() * 0.05)


async def run(url: str, clients: int, seconds: float, seed: int) -> list[Any]:
    out: list[tuple[str, float, int, float]] = []
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conns = [Conn(host, int(port)) for _ in range(clients)]
    stop_at = time.monotonic() + seconds
    try:
        await asyncio.gather(*(client(c, stop_at, random.Random(seed + i), out)
                               for i, c in enumerate(conns)))
    finally:
        for c in conns:
            c.close()
    return out


def report(results: list[tuple[str, float, int, float]], seconds: float, max_used: int,
           total: int) -> dict[str, Any]:
    by_kind: dict[str, list[float]] = defaultdict(list)
    classes: Counter[str] = Counter()
    for kind, took, code, _ in results:
        by_kind[kind].append(took)
        classes[f"{code // 100}xx" if code else "transport"] += 1
    lateness = [late for kind, _, code, late in results if kind == "acquire"]
    slow = sum(1 for _, took, _, _ in results if took > SLOW_S)
    return {
        "answers": len(results), "answers_per_s": round(len(results) / seconds, 1),
        "over_30s": slow, "status_classes": dict(classes),
        "worst_s": {k: round(max(v), 2) for k, v in sorted(by_kind.items())},
        "p99_s": {k: round(pct(v, 99), 3) for k, v in sorted(by_kind.items())},
        "acquire_late_s": {"p50": round(pct(lateness, 50), 3),
                           "p99": round(pct(lateness, 99), 3),
                           "max": round(max(lateness, default=0.0), 3)},
        "max_vram_used_mb": max_used, "total_mb": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="concurrency")
    args = ap.parse_args()
    print(f"{args.clients} concurrent mixed clients for {args.seconds:g}s (root inventory, "
          "simulated 24 GB GPU)")
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as tmp:
        d = DaemonProc(Path(tmp)).start()
        sampler = Sampler(d.sim_dir, 24576)
        try:
            results = asyncio.run(run(d.url, args.clients, args.seconds, args.seed))
        finally:
            sampler.stop()
            d.close()
    data = report(results, args.seconds, sampler.max_used, 24576)
    row("answers (per second)", f"{data['answers']} ({data['answers_per_s']}/s)")
    row("answers over 30 s", str(data["over_30s"]), "target 0")
    row("by status class", ", ".join(f"{k} {v}" for k, v in sorted(
        data["status_classes"].items())), "5xx: 0")
    row("worst answer by kind (s)", ", ".join(f"{k} {v}" for k, v in data["worst_s"].items()))
    late = data["acquire_late_s"]
    row("acquire late beyond its timeout (s)", f"p50 {late['p50']} p99 {late['p99']} "
        f"max {late['max']}")
    row("max VRAM in use (MB)", f"{data['max_vram_used_mb']} of {data['total_mb']}",
        "never over")
    print(f"  -> {write(args.out, {'clients': args.clients, 'seconds': args.seconds, **data})}")


if __name__ == "__main__":
    main()
