"""A small HTTP/1.1 load generator (keep-alive, asyncio streams), open- and closed-loop.

Open-loop latency is measured from each request's *scheduled* send time, so a server that
stalls is charged for the queue it causes (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import pct


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def request(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str,
                  method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """One request on a keep-alive connection (a JSON body when given): status and body."""
    reader, writer = conn
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + (body or b""))
    await writer.drain()
    raw = await reader.readuntil(b"\r\n\r\n")
    status = int(raw.split(b" ", 2)[1])
    length = 0
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return status, await reader.readexactly(length)


async def _request(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], host: str,
                   path: str) -> int:
    status, _ = await request(conn, host, "GET", path)
    return status


async def open_loop(host: str, port: int, path: str, rate: float, duration: float,
                    conns: int = 64) -> dict[str, Any]:
    pool: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(conns):
        pool.put_nowait(await _connect(host, port))
    latencies: list[float] = []
    errors = 0
    n = int(rate * duration)
    t0 = time.perf_counter() + 0.05

    async def one(scheduled: float) -> None:
        nonlocal errors
        conn = await pool.get()
        try:
            status = await _request(conn, host, path)
            if status != 200:
                errors += 1
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
            conn = await _connect(host, port)
        finally:
            pool.put_nowait(conn)
        latencies.append((time.perf_counter() - scheduled) * 1000)

    tasks = []
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    while not pool.empty():
        _, writer = pool.get_nowait()
        writer.close()
    return {"rate": rate, "sent": n, "errors": errors, "achieved_rps": n / elapsed,
            "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99),
            "max_ms": max(latencies)}


async def closed_loop(host: str, port: int, path: str, duration: float,
                      conns: int = 16) -> dict[str, Any]:
    count = 0
    stop = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal count
        conn = await _connect(host, port)
        while time.perf_counter() < stop:
            await _request(conn, host, path)
            count += 1
        conn[1].close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return {"requests": count, "rps": count / (time.perf_counter() - t0)}
