"""A stand-in GPU service: holds N MB of (simulated or real) VRAM and serves a health endpoint.

    python -m gpu_manager.sim.workload --vram-mb N --port P [--startup-s S] [--stop-s S]
        [--ignore-sigterm] [--crash-after-s S] [--cuda] [--name NAME] [--sim-dir DIR]

- Simulated (default): registers its pid and MB with the simulated GPU's registry; the probe
  counts it while this process lives (plus the release delay). If the simulated GPU lacks the
  room, it fails like CUDA does: "CUDA out of memory" and exit code 3.
- `--cuda`: really allocates N MB on the GPU with torch or cupy, whichever is installed.
- `GET /health`: 503 until `--startup-s` has passed, then 200 with a small JSON body.
- SIGTERM/SIGINT: exits (after `--stop-s`, modelling a slow shutdown) unless `--ignore-sigterm`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gpu_manager.paths import sim_dir
from gpu_manager.sim.registry import SimRegistry, SimulatedOOM

EXIT_OOM = 3
EXIT_CRASH = 70


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpu_manager.sim.workload",
                                description="A stand-in GPU service.")
    p.add_argument("--vram-mb", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", default="workload")
    p.add_argument("--device", type=int, default=0)
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
    args = p.parse_args(argv)
    if args.vram_mb < 0:
        p.error("--vram-mb must be >= 0")
    return args


def allocate_cuda(mb: int, device: int) -> Any:
    """Hold `mb` MB of real device memory; returns the buffer (keep a reference)."""
    n = mb * 1024 * 1024
    # Optional heavy dependencies, looked up at run time: neither is a dependency of ours.
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        pass
    else:
        buf = torch.empty(n, dtype=torch.uint8, device=f"cuda:{device}")
        buf.fill_(1)  # touch it, so the driver really backs every page
        torch.cuda.synchronize(device)
        return buf
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        raise SystemExit("--cuda needs torch or cupy installed") from None
    with cupy.cuda.Device(device):
        buf = cupy.ones(n, dtype=cupy.uint8)
        cupy.cuda.Device(device).synchronize()
        return buf


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        srv = self.server
        if self.path.split("?")[0] != "/health":
            self._reply(404, {"error": "not found"})
            return
        now = time.monotonic()
        ready = now >= srv.ready_at
        sick = srv.sick_at is not None and now >= srv.sick_at
        code = 500 if sick else 200 if ready else 503
        self._reply(code, {
            "status": "unhealthy" if sick else "ok" if ready else "starting",
            "name": srv.name, "pid": os.getpid(), "vram_mb": srv.vram_mb,
            # wall-clock time /health turned 200, so callers can measure their own latency
            "ready_at": time.time() - (now - srv.ready_at),
            # this process's own start-to-healthy time, exec included (CLOCK_BOOTTIME based:
            # psutil's create_time is only as precise as the whole-second boot time)
            "startup_total_s": srv.ready_at - now + time.clock_gettime(time.CLOCK_BOOTTIME)
            - _process_start_boottime(),
        })

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # health checks every 100 ms would flood the service log


def _process_start_boottime() -> float:
    """When this process was created, in CLOCK_BOOTTIME seconds (from /proc/self/stat)."""
    stat = Path("/proc/self/stat").read_text()
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return start_ticks / os.sysconf("SC_CLK_TCK")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ready_at: float
    sick_at: float | None
    name: str
    vram_mb: int


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
    if args.cuda:
        buffer = allocate_cuda(args.vram_mb, args.device)
    else:
        registry = SimRegistry(args.sim_dir or sim_dir())
        try:
            registry.register(os.getpid(), args.vram_mb, args.name, args.device)
        except SimulatedOOM as exc:
            print(exc, file=sys.stderr, flush=True)
            return EXIT_OOM
    # The memory is held; it is released by the process's death, never by unregistering,
    # so the release delay models the driver's teardown for every way of dying.

    server = _Server((args.host, args.port), _Handler)
    server.ready_at = started + args.startup_s
    server.sick_at = None if args.unhealthy_after_s is None else started + args.unhealthy_after_s
    server.name = args.name
    server.vram_mb = args.vram_mb
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    print(f"{args.name}: pid {os.getpid()} holds {args.vram_mb} MB, health on "
          f"http://{args.host}:{args.port}/health", flush=True)

    if args.crash_after_s is None:
        signal.sigwait(sigs)
    else:
        left = max(0.0, started + args.crash_after_s - time.monotonic())
        if signal.sigtimedwait(sigs, left) is None:
            print(f"{args.name}: crashing as asked (--crash-after-s)", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_CRASH)
    if args.stop_s > 0:
        time.sleep(args.stop_s)  # modelling a slow shutdown is this option's whole purpose
    # No server.shutdown(): it waits out serve_forever's 0.5 s poll. The serving thread is a
    # daemon thread and ends with the process.
    server.server_close()
    del buffer
    return 0


if __name__ == "__main__":
    sys.exit(main())
