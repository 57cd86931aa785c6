"""The front door (/v1 on the daemon's port): what it adds to a request, and what it buys
when two models take turns, each against a baseline measured in the same run (how: the
comments below and docs/benchmarks-notes.md). `python -m bench frontdoor [--requests 2000
--streams 200 --tries 10 --seconds 30]`. The client is plain HTTP/1.1 over asyncio streams
(bench.loadgen): its own cost stays small on 2 cores."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from bench.common import pct, row, write
from bench.loadgen import request
from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import DaemonProc
from tests.support.env import free_port
from tests.support.served import served

HOST, CHAT_PATH = "127.0.0.1", "/v1/chat/completions"
TOTAL_MB = 24576  # the root inventory's card
COLD_S, WAKE_S, ALT_VRAM, ALT_TOKENS = 2.0, 0.2, 14000, 4
TARGETS = {"added_p50_ms": 1.0, "added_p99_ms": 3.0, "stream_ratio": 0.95,
           "wake_extra_ms": 150.0, "alternation_ratio": 3.0}
now = time.perf_counter


class Conn:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.io: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.io is None or self.io[0].at_eof():  # the daemon closes idle ones after 5 s
            self.close()
            self.io = await asyncio.open_connection(HOST, self.port)
        return self.io

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        return await request(await self._open(), HOST, method, path,
                             body and json.dumps(body).encode())

    async def stream(self, path: str, body: dict[str, Any]) -> tuple[float, float, int]:
        """POST a streamed request: (first token, last token, tokens) as they arrive."""
        reader, writer = await self._open()
        data = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
            raise RuntimeError(f"a stream on port {self.port} answered {head!r}")
        first, last, tokens, buf = 0.0, 0.0, 0, b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                return first, last, tokens
            at = now()
            *events, buf = (buf + chunk).split(b"\n\n")
            for event in events:
                if b'"content"' in event:  # a token (the finish chunk's delta is empty)
                    tokens += 1
                    first, last = first or at, at

    def close(self) -> None:
        if self.io is not None:
            self.io[1].close()
            self.io = None


def chat(model: str, tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": tokens, "stream": stream}


async def ok(conn: Conn, method: str, path: str, body: Any = None) -> bytes:
    status, data = await conn.call(method, path, body)
    if status != 200:
        raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
    return data


def stats(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(ms, 50), 3), "p99_ms": round(pct(ms, 99), 3), "n": len(ms)}


async def blocks(n: int, size: int, one: Callable[[str], Awaitable[None]]) -> None:
    """n samples each way in blocks, A B B A ..., so a drift of the machine hits both."""
    for b in range(max(1, n // size)):
        for way in ("direct", "door") if b % 2 == 0 else ("door", "direct"):
            for _ in range(size):
                await one(way)


# -- 1. a 1-token chat completion (non-streamed), direct vs through /v1 ----------------------
async def latency(conns: dict[str, Conn], n: int) -> dict[str, Any]:
    ms: dict[str, list[float]] = {"direct": [], "door": []}

    async def one(way: str) -> None:
        t0 = now()
        await ok(conns[way], "POST", CHAT_PATH, chat("fast", 1))
        ms[way].append((now() - t0) * 1000)

    await blocks(400, 200, one)  # warm-up: connections, caches, the daemon's upstream pool
    ms = {"direct": [], "door": []}
    await blocks(n, 100, one)
    d, f = stats(ms["direct"]), stats(ms["door"])
    return {"direct": d, "door": f, "added_p50_ms": round(f["p50_ms"] - d["p50_ms"], 3),
            "added_p99_ms": round(f["p99_ms"] - d["p99_ms"], 3)}


# -- 2. 11-token streams at 2 ms a token: the decode rate (tokens after the first / first to last
# token) is what the relay passes on; the end-to-end rate also carries 1's added latency
async def streaming(conns: dict[str, Conn], n: int) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float, int, float]]] = {"direct": [], "door": []}

    async def one(way: str) -> None:
        t0 = now()
        first, last, tokens = await conns[way].stream(CHAT_PATH, chat("stream", 11, True))
        runs[way].append((first, last, tokens, now() - t0))

    await blocks(2, 1, one)  # warm-up
    runs = {"direct": [], "door": []}
    await blocks(n, 20, one)
    out: dict[str, Any] = {}
    for way, rs in runs.items():
        tokens = sum(k for _, _, k, _ in rs)
        out[way] = {"tokens": tokens, "streams": len(rs), "end_to_end_tok_s": round(
            tokens / sum(e for *_, e in rs), 1), "decode_tok_s": round(
            (tokens - len(rs)) / sum(b - a for a, b, _, _ in rs), 1)}
    for key in ("decode", "end_to_end"):
        out[f"ratio_{key}"] = round(out["door"][f"{key}_tok_s"] / out["direct"][f"{key}_tok_s"], 3)
    return out


# -- 3. asleep, send to first token through /v1 vs its own wake (/wake_up, a direct stream)
async def wake(api: Conn, conns: dict[str, Conn], tries: int) -> dict[str, Any]:
    ms: dict[str, list[float]] = {"direct": [], "door": []}
    direct = conns["direct"]
    for _ in range(tries):
        for way in ("direct", "door"):
            await ok(api, "POST", "/gpu/service/fd-fast/sleep")  # and it says so itself:
            if json.loads(await ok(direct, "GET", "/is_sleeping")) != {"is_sleeping": True}:
                raise RuntimeError("fd-fast is not asleep after the daemon's sleep")
            t0 = now()
            if way == "direct":
                await ok(direct, "POST", "/wake_up")
            first, _, _ = await conns[way].stream(CHAT_PATH, chat("fast", 1, True))
            ms[way].append((first - t0) * 1000)
            # woken behind its back: the daemon must see the memory back ("awake on its own",
            # within a poll or two) before it is asked to sleep it again
            for _ in range(200 if way == "direct" else 0):
                status = json.loads(await ok(api, "GET", "/gpu/status"))
                if status["services"]["fd-fast"]["state"] == "ready":
                    break
                await asyncio.sleep(0.05)
    d, f = stats(ms["direct"]), stats(ms["door"])
    return {"direct": d, "door": f, "samples_ms": ms,
            "extra_p50_ms": round(f["p50_ms"] - d["p50_ms"], 1),
            "extra_max_ms": round(max(ms["door"]) - min(ms["direct"]), 1)}


# -- 4. two 14000 MB models that do not fit together, a client each: the daemon vs FIFO swaps
async def take_turns(call: Callable[[str], Awaitable[bool]], seconds: float) -> dict[str, Any]:
    """Two clients, one per model, each looping for `seconds`: the answers within it."""
    done: dict[str, list[tuple[float, float]]] = {"model-a": [], "model-b": []}
    errors, t0 = 0, now()

    async def client(model: str) -> None:
        nonlocal errors
        while (sent := now() - t0) < seconds:
            if await call(model):
                done[model].append((sent, now() - t0))
            else:
                errors += 1
                await asyncio.sleep(0.1)

    await asyncio.gather(*(client(m) for m in done))
    counted = {m: sum(1 for _, t in v if t <= seconds) for m, v in done.items()}
    return {"answers": counted, "errors": errors, "seconds": seconds,
            "per_min": round(sum(counted.values()) / seconds * 60, 1),
            "worst_answer_s": {m: round(max((b - a for a, b in v), default=0), 2)
                               for m, v in done.items()}}


class FifoSwapper:
    """llama-swap's model, client-side: one model at a time; a request for another waits its
    turn (asyncio.Lock: arrival order), stops the running one (SIGTERM, wait for the exit, and
    for the card to release its memory), spawns the other, polls /health every 50 ms
    (llama-swap: after 250 ms, then every 5 s; this is kinder to it), then forwards."""

    def __init__(self, commands: dict[str, tuple[list[str], int]], sim_dir: Path) -> None:
        self.commands, self.sim_dir = commands, sim_dir
        self.registry = SimRegistry(sim_dir)
        self.registry.write_gpu(TOTAL_MB, 500, 0)  # the daemon's card and delay; makes the dir
        self.env = {**os.environ, "GPU_MANAGER_SIM_DIR": str(sim_dir)}
        self.env.pop("CUDA_VISIBLE_DEVICES", None)
        self.log = open(sim_dir / "stand-ins.log", "ab")  # noqa: SIM115 (closed in close())
        self.lock = asyncio.Lock()
        self.model: str | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.conn = Conn(0)  # none before the first swap
        self.swaps: list[float] = []

    async def call(self, model: str) -> bool:
        async with self.lock:
            if model != self.model:
                t0 = now()
                await self._swap(model)
                self.swaps.append(now() - t0)
            status, _ = await self.conn.call("POST", CHAT_PATH, chat(model, ALT_TOKENS))
            return status == 200

    async def _swap(self, model: str) -> None:
        await self.stop(signal.SIGTERM)
        while sum(r.mb for r in self.registry.active()) + ALT_VRAM > TOTAL_MB:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the release of the dead process's memory (500 ms)
        argv, port = self.commands[model]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.model, self.conn = model, Conn(port)
        for _ in range(600):  # up to 30 s
            probe, status = Conn(port), 0
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                status = (await probe.call("GET", "/health"))[0]
            probe.close()
            if status == 200:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{model} did not come up; see {self.sim_dir}/stand-ins.log")

    async def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the running one (its own process group) and wait for its exit."""
        self.conn.close()
        if self.proc is not None and self.proc.returncode is None:
            os.killpg(self.proc.pid, sig)
            await self.proc.wait()

    def close(self) -> None:
        """After the loop: whatever a failed run left, by its process group."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


async def alternation(d: DaemonProc, fifo: FifoSwapper, seconds: float) -> dict[str, Any]:
    conns = {m: Conn(d.port) for m in ("model-a", "model-b")}

    async def door(model: str) -> bool:
        status, _ = await conns[model].call("POST", CHAT_PATH, chat(model, ALT_TOKENS))
        return status == 200

    try:
        for m in conns:  # warm: both cold-started once, llm-a asleep, llm-b awake
            await door(m)
        before = sum(s["wakes"] for s in d.status()["services"].values())
        ours = await take_turns(door, seconds)
        ours["switches"] = sum(s["wakes"] for s in d.status()["services"].values()) - before
    finally:
        for c in conns.values():
            c.close()
    await fifo.call("model-a")  # warm: one loaded
    fifo.swaps.clear()
    base = await take_turns(fifo.call, seconds)
    base["switches"] = len(fifo.swaps)
    base["switch_s_mean"] = round(sum(fifo.swaps) / max(1, len(fifo.swaps)), 2)
    return {"gpu_manager": ours, "fifo": base,
            "ratio": round(ours["per_min"] / max(base["per_min"], 1e-9), 2)}


def stand_ins() -> tuple[str, dict[str, int], dict[str, tuple[list[str], int]]]:
    """The daemon's served services, their ports; the swapper's: the same lines, other ports."""
    ports = {n: free_port() for n in ("fd-fast", "fd-stream", "llm-a", "llm-b")}
    llm = {n: served(n, ports[n], f"model-{n[-1]}", vram=ALT_VRAM, startup=COLD_S, wake=WAKE_S)
           for n in ("llm-a", "llm-b")}
    extra = "".join((served("fd-fast", ports["fd-fast"], "fast", vram=2000, wake=WAKE_S,
                            token_ms=0),
                     served("fd-stream", ports["fd-stream"], "stream", vram=2000), *llm.values()))
    fifo = {}
    for name, block in llm.items():
        port = free_port()
        argv = yaml.safe_load(block.replace(str(ports[name]), str(port)))[name]["command"]
        fifo[f"model-{name[-1]}"] = ([a.replace("{python}", sys.executable) for a in argv], port)
    return extra, ports, fifo


async def run(d: DaemonProc, ports: dict[str, int], fifo: FifoSwapper,
              args: argparse.Namespace) -> dict[str, Any]:
    api = Conn(d.port)
    fast = {"direct": Conn(ports["fd-fast"]), "door": Conn(d.port)}
    stream = {"direct": Conn(ports["fd-stream"]), "door": Conn(d.port)}
    try:
        for model in ("fast", "stream"):  # cold start through the door, once
            await ok(fast["door"], "POST", CHAT_PATH, chat(model, 1))
        out = {"latency": await latency(fast, args.requests),
               "stream": await streaming(stream, args.streams),
               "wake": await wake(api, fast, args.tries)}
        for name in ("fd-fast", "fd-stream"):  # out of the way of the 14000 MB pair
            await ok(api, "POST", f"/gpu/service/{name}/stop")
        out["alternation"] = await alternation(d, fifo, args.seconds)
        return out
    finally:
        for c in (api, *fast.values(), *stream.values()):
            c.close()
        await fifo.stop()


def report(r: dict[str, Any]) -> dict[str, bool]:
    """Print the table; the targets met."""
    lat, st, wk, alt, t = r["latency"], r["stream"], r["wake"], r["alternation"], TARGETS
    g, f = alt["gpu_manager"], alt["fifo"]
    worst = {"g": max(g["worst_answer_s"].values()), "f": max(f["worst_answer_s"].values())}
    met = {"added_p50": lat["added_p50_ms"] <= t["added_p50_ms"],
           "added_p99": lat["added_p99_ms"] <= t["added_p99_ms"],
           "stream": st["ratio_decode"] >= t["stream_ratio"],
           "wake": wk["extra_p50_ms"] <= t["wake_extra_ms"],
           # taking turns: no answer waits longer than the FIFO swapper's slowest one
           "alternation": alt["ratio"] >= t["alternation_ratio"] and worst["g"] <= worst["f"]}
    mark = {k: "met" if v else "MISSED" for k, v in met.items()}

    def ab(x: dict[str, Any]) -> str:
        a, b = x["answers"].values()
        return f"{a}/{b}, {x['switches']}, {x['errors']}"

    def pair(x: dict[str, Any], key: str, fmt: str = ".2f") -> str:
        return f"{x['direct'][key]:{fmt}} / {x['door'][key]:{fmt}}"

    print(f"  llm-a/b stand-ins: --startup-s {COLD_S} (+ interpreter), --wake-s {WAKE_S}")
    for cells in (
        ("1-token chat p50; p99, direct / through (ms)",
         f"{pair(lat, 'p50_ms')}; {pair(lat, 'p99_ms')}", ""),
        ("  added p50 / p99 (ms)", f"{lat['added_p50_ms']:.2f} / {lat['added_p99_ms']:.2f}",
         f"<= 1 / 3 ms: {mark['added_p50']} / {mark['added_p99']}"),
        ("stream tok/s decode; end-to-end, direct / through",
         f"{pair(st, 'decode_tok_s', '.0f')}; {pair(st, 'end_to_end_tok_s', '.0f')}", ""),
        ("  ratio decode; end-to-end (+ added latency)",
         f"{st['ratio_decode']:.3f}; {st['ratio_end_to_end']:.3f}", f">= 0.95: {mark['stream']}"),
        ("asleep -> first token p50, own / through (ms)", pair(wk, "p50_ms", ".0f"), ""),
        ("  extra p50 (worst through - best own), ms",
         f"{wk['extra_p50_ms']:.0f} ({wk['extra_max_ms']:.0f})", f"<= +150: {mark['wake']}"),
        (f"two models {g['seconds']:g} s, answers/min: ours / FIFO",
         f"{g['per_min']:.0f} / {f['per_min']:.0f}", ""),
        ("  ratio; slowest answer, ours / FIFO",
         f"{alt['ratio']:.1f}x; {worst['g']} / {worst['f']} s",
         f">= 3x; <= FIFO's: {mark['alternation']}"),
        ("  answers a/b, switches, errors: ours; FIFO", f"{ab(g)}; {ab(f)}",
         f"a swap {f['switch_s_mean']} s"),
    ):
        row(*cells)
    return met


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag, default in (("requests", 2000), ("streams", 200), ("tries", 10),
                          ("seconds", 30.0), ("out", "frontdoor")):
        ap.add_argument(f"--{flag}", type=type(default), default=default)
    args = ap.parse_args()
    t0 = time.monotonic()
    extra, ports, commands = stand_ins()
    with tempfile.TemporaryDirectory(prefix="gm-bench-fd-") as tmp:
        fifo = FifoSwapper(commands, Path(tmp) / "fifo")
        d = DaemonProc(Path(tmp) / "daemon", extra_services=extra)
        try:
            d.start()
            result = asyncio.run(run(d, ports, fifo, args))
        finally:
            try:  # each cleanup runs whatever the other does
                fifo.close()
            finally:
                d.close()
    result["met"] = report(result)
    seconds = round(time.monotonic() - t0, 1)
    print(f"  ({seconds:.0f} s) -> " + str(write(args.out, {
        "command": "python -m bench frontdoor", "args": vars(args), "seconds": seconds,
        "stand_ins": {"startup_s_llm": COLD_S, "startup_s_other": 0.5, "wake_s": WAKE_S,
                      "sleep_s": 0.1, "release_delay_ms": 500, "alt_max_tokens": ALT_TOKENS},
        "targets": TARGETS, **result})))


if __name__ == "__main__":
    main()
