"""A stand-in GPU service: holds N MB of (simulated or real) VRAM and serves a health endpoint.

    python -m gpu_manager.sim.workload --vram-mb N --port P [--startup-s S] [--stop-s S]
        [--ignore-sigterm] [--crash-after-s S] [--cuda] [--name NAME] [--sim-dir DIR]
        [--busy-pct P]
        [--api vllm|sglang|comfyui|ollama|tabbyapi [--sleep-s S] [--wake-s S]
         [--sleep-vram-mb N] [--weights-mb N] [--model NAME] [--sleep-keeps-memory]
         [--token-ms F] [--steps N] [--context-tokens N]]

- Simulated (default): registers its pid and MB with the simulated GPU's registry; the probe
  counts it while this process lives (plus the release delay). If the simulated GPU lacks the
  room, it fails like CUDA does: "CUDA out of memory" and exit code 3.
- `--cuda`: really allocates N MB on the GPU with torch or cupy, whichever is installed.
- `GET /health`: 503 until `--startup-s` has passed, then 200 with a small JSON body.
- `POST /sim/busy {"seconds": S, "util_pct": P}`: the simulated probe reports this process at
  P % SM utilisation (default `--busy-pct`) for S seconds, with no request; 200
  {"busy_until": wall time}. A process also counts busy at `--busy-pct` while it answers an
  inference request (OpenAI routes, a ComfyUI prompt running). `--cuda`: 409, the real driver
  measures the load.
- SIGTERM/SIGINT: exits (after `--stop-s`, modelling a slow shutdown) unless `--ignore-sigterm`;
  after a SIGTERM it dies of it (exit status -15, 143 in a shell), as uvicorn's servers do.
- `--api KIND`: also speaks that server's sleep/wake API (gpu_manager/sim/apis.py): sleeping
  takes `--sleep-s` and then drops the memory to `--sleep-vram-mb` (default 0: the registration
  stays, at 0 MB); waking takes it back (refused like a fresh allocation when it does not fit)
  and takes `--wake-s` (plus `--startup-s` after a vLLM level 2 sleep, which dropped the
  weights). `--sleep-keeps-memory` is a fault: sleep answers as usual but frees nothing.
  The API answers 503 until `--startup-s` has passed (a real server is not listening yet).
  vllm/sglang/ollama/tabbyapi also serve OpenAI's /v1/models, /v1/chat/completions,
  /v1/completions and /v1/embeddings: a fixed text at `--token-ms` per token, streamed as
  server-sent events on request (a prompt plus `max_tokens` beyond `--context-tokens`: 400
  `context_length_exceeded`, streamed or not, as vLLM answers it); comfyui runs each prompt
  for `--steps` steps of `--token-ms` and reports them on its /ws WebSocket
  (gpu_manager/sim/inference.py, comfyui.py).

HTTP/1.1: replies keep the connection open (every whole reply carries Content-Length),
streams are sent with chunked transfer encoding, and /ws switches the connection to a
WebSocket.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpu_manager.paths import sim_dir
from gpu_manager.sim.apis import KINDS, Api, make_api, model_parts
from gpu_manager.sim.handler import Handler, StandInServer
from gpu_manager.sim.memory import (
    Backend,
    CudaBackend,
    DeviceOOM,
    ModelMemory,
    SimulatedBackend,
    allocate_cuda,
)
from gpu_manager.sim.registry import EXIT_OOM, SimRegistry, SimulatedOOM, hold, placement
from gpu_manager.sim.serving import DEFAULT_UTIL_PCT, Busy, Serving

EXIT_CRASH = 70


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpu_manager.sim.workload",
                                description="A stand-in GPU service.")
    p.add_argument("--vram-mb", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", default="workload")
    p.add_argument("--device", type=int, default=None,
                   help="the card to register on [default: the first of CUDA_VISIBLE_DEVICES "
                   "when the daemon placed it (all of them are held), else 0]")
    p.add_argument("--startup-s", type=float, default=0.0,
                   help="seconds before /health turns 200 (models loading)")
    p.add_argument("--stop-s", type=float, default=0.0,
                   help="seconds between SIGTERM and exit (models a slow shutdown)")
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--unhealthy-after-s", type=float, default=None,
                   help="/health answers 500 from this many seconds after start on")
    p.add_argument("--crash-after-s", type=float, default=None,
                   help="exit with code 70 after this many seconds")
    p.add_argument("--cuda", action="store_true", help="allocate real GPU memory")
    p.add_argument("--sim-dir", type=Path, default=None,
                   help="the simulated GPU's registry [default: $GPU_MANAGER_SIM_DIR]")
    p.add_argument("--api", choices=KINDS, default=None,
                   help="also speak this server's sleep/wake HTTP API")
    p.add_argument("--sleep-s", type=float, default=0.0,
                   help="seconds a sleep takes before the memory is released")
    p.add_argument("--wake-s", type=float, default=0.0,
                   help="seconds a wake takes once the memory is taken back")
    p.add_argument("--sleep-vram-mb", type=int, default=0,
                   help="MB still held while asleep (CUDA context, buffers) [default: 0]")
    p.add_argument("--weights-mb", type=int, default=None,
                   help="vllm/sglang: MB of the 'weights' tag; the rest of what sleep releases "
                        "is 'kv_cache' [default: half]")
    p.add_argument("--model", default=None, help="the served model's name [default: --name]")
    p.add_argument("--sleep-keeps-memory", action="store_true",
                   help="fault: sleep answers as usual but releases nothing")
    p.add_argument("--token-ms", type=float, default=0.0,
                   help="milliseconds per generated token (and per ComfyUI step) [default: 0]")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="the model's context: a prompt's words plus max_tokens beyond it is a "
                        "400 context_length_exceeded [default: no limit]")
    p.add_argument("--steps", type=int, default=5,
                   help="comfyui: sampler steps a prompt runs [default: 5]")
    p.add_argument("--busy-pct", type=int, default=DEFAULT_UTIL_PCT,
                   help="SM utilisation reported while a request is in flight, and by "
                        f"/sim/busy without util_pct [default: {DEFAULT_UTIL_PCT}]")
    args = p.parse_args(argv)
    if args.vram_mb < 0:
        p.error("--vram-mb must be >= 0")
    if not 0 <= args.sleep_vram_mb <= args.vram_mb:
        p.error("--sleep-vram-mb must be between 0 and --vram-mb")
    if min(args.sleep_s, args.wake_s) < 0:
        p.error("--sleep-s and --wake-s must be >= 0")
    if args.token_ms < 0 or args.steps < 0:
        p.error("--token-ms and --steps must be >= 0")
    if args.context_tokens is not None and args.context_tokens < 1:
        p.error("--context-tokens must be >= 1")
    if not 0 <= args.busy_pct <= 100:
        p.error("--busy-pct must be between 0 and 100")
    return args


def _start_api(args: argparse.Namespace, registry: SimRegistry | None,
               serving: Serving) -> Api:
    """Take the full VRAM, in parts that the API's sleep and wake release and take back."""
    parts = model_parts(args.api, args.vram_mb - args.sleep_vram_mb, args.weights_mb)
    backend: Backend
    device, also = placement(args.device)
    if registry is None:
        # CUDA numbers only the visible cards: the first one it sees is ours
        backend = CudaBackend(args.device or 0)
    else:
        registry.register(os.getpid(), args.vram_mb, args.name, device, also)
        backend = SimulatedBackend(registry, device=device)
    memory = ModelMemory(backend, parts, args.sleep_vram_mb, sleep_s=args.sleep_s,
                         wake_s=args.wake_s, reload_s=args.startup_s,
                         keeps_memory=args.sleep_keeps_memory)
    if args.cuda:
        backend.apply(memory.held())  # the simulated registration above already holds it
    return make_api(args.api, memory, args.model or args.name, serving)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    # Signals are taken synchronously by the main thread (sigwait): blocked here, before any
    # thread exists, so every thread inherits the block. Otherwise the kernel may hand SIGTERM
    # to the health thread while the main thread sleeps on a lock that no signal interrupts.
    sigs = {signal.SIGINT} | (set() if args.ignore_sigterm else {signal.SIGTERM})
    if args.ignore_sigterm:
        # SIG_IGN, not a handler: the process must really ignore it, as a hung service does.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)

    buffer: Any = None
    api: Api | None = None
    # --cuda: the real driver measures memory and load; there is nothing to register.
    registry = None if args.cuda else SimRegistry(args.sim_dir or sim_dir())
    busy = Busy(registry, util_pct=args.busy_pct)
    if args.api is not None:
        try:
            api = _start_api(args, registry, Serving(
                args.name, args.token_ms / 1000, args.steps, busy=busy,
                context_tokens=args.context_tokens))
        except (DeviceOOM, SimulatedOOM) as exc:
            print(exc, file=sys.stderr, flush=True)
            return EXIT_OOM
    elif registry is None:
        buffer = allocate_cuda(args.vram_mb, args.device or 0)
    else:
        refused = hold(registry, args.vram_mb, args.name, args.device)
        if refused is not None:
            return refused
    # The memory is held; it is released by the process's death, never by unregistering,
    # so the release delay models the driver's teardown for every way of dying.

    server = StandInServer((args.host, args.port), Handler)
    server.ready_at = started + args.startup_s
    server.sick_at = None if args.unhealthy_after_s is None else started + args.unhealthy_after_s
    server.name = args.name
    server.vram_mb = args.vram_mb
    server.api = api
    server.busy = busy
    if api is not None:
        api.start()
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    print(f"{args.name}: pid {os.getpid()} holds {args.vram_mb} MB, health on "
          f"http://{args.host}:{args.port}/health", flush=True)

    if args.crash_after_s is None:
        got = signal.sigwait(sigs)
    else:
        left = max(0.0, started + args.crash_after_s - time.monotonic())
        info = signal.sigtimedwait(sigs, left)
        if info is None:
            print(f"{args.name}: crashing as asked (--crash-after-s)", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_CRASH)
        got = signal.Signals(info.si_signo)
    if args.stop_s > 0:
        time.sleep(args.stop_s)  # modelling a slow shutdown is this option's whole purpose
    # No server.shutdown(): it waits out serve_forever's 0.5 s poll. The serving thread is a
    # daemon thread and ends with the process (a stream in flight is dropped mid-way, with
    # no last chunk, as uvicorn's servers drop theirs).
    server.server_close()
    del buffer
    if got == signal.SIGTERM:
        die_of(signal.SIGTERM)
    return 0


def die_of(sig: signal.Signals) -> None:
    """Exit by `sig` after a clean shutdown, as the real servers do: uvicorn (llama.cpp's
    Python server, vLLM, SGLang) re-raises the SIGTERM it handled, so their exit status is
    "killed by SIGTERM" (143 in a shell), never 0."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)  # pending while blocked: delivered, fatally, at the unblock
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os._exit(128 + sig)  # not reached; the same status, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
