"""Small real servers that stand in for Ollama and for a pausable transcription service.

Their "model" memory is a child stand-in workload registered with the simulated GPU, so
unloading or pausing frees real (simulated) VRAM the daemon's probe can see come back.

    python -m tests.support.fakes ollama --port P --model qwen --model-mb 18000
    python -m tests.support.fakes transcription --port P --vram-mb 8000 --redis-url URL
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gpu_manager.paths import sim_dir
from gpu_manager.sim.registry import SimRegistry


class Model:
    """A loaded model: a child process whose registration holds `mb` on the simulated GPU."""

    def __init__(self, name: str, mb: int) -> None:
        self.name, self.mb = name, mb
        self.proc: subprocess.Popen[bytes] | None = None

    def load(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpu_manager.sim.workload", "--vram-mb", str(self.mb),
                 "--port", "0", "--name", f"model-{self.name}"], stdout=subprocess.DEVNULL)
            registry = SimRegistry(sim_dir())
            deadline = time.monotonic() + 20
            while not any(r.pid == self.proc.pid for r in registry.active()):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"model {self.name} failed to load")
                time.sleep(0.02)

    def unload(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.proc = None

    @property
    def loaded(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def released(self) -> bool:
        """The simulated GPU no longer counts this model's memory (release delay passed)."""
        return not any(r.name == f"model-{self.name}" for r in SimRegistry(sim_dir()).active())


class Handler(BaseHTTPRequestHandler):
    server: Server

    def _reply(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        n = int(self.headers.get("Content-Length") or 0)
        data = json.loads(self.rfile.read(n) or b"{}")
        return data if isinstance(data, dict) else {}

    def do_GET(self) -> None:
        model = self.server.model
        if self.path in ("/health", "/api/tags"):
            self._reply(200, {"status": "ok", "models": [{"name": model.name}]})
        elif self.path == "/api/ps":
            self._reply(200, {"models": [{"name": model.name, "model": model.name,
                                          "size_vram": model.mb * 1024 * 1024}]
                              if model.loaded else []})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        model = self.server.model
        if self.path == "/api/generate":
            body = self._body()
            if body.get("model") != model.name:
                self._reply(404, {"error": f"model {body.get('model')!r} not found"})
            elif body.get("keep_alive") in (0, "0", "0s"):
                model.unload()
                self._reply(200, {"model": model.name, "done": True, "done_reason": "unload"})
            else:
                model.load()
                self._reply(200, {"model": model.name, "done": True})
        else:
            self._reply(404, {"error": "not found"})

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    model: Model


def subscribe(redis_url: str) -> tuple[Any, Any]:
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.set("gpu_state", "transcription")
    pubsub = r.pubsub()
    pubsub.subscribe("transcription_pause", "transcription_resume")
    pubsub.get_message(timeout=5)  # the confirmation: from here on no pause is missed
    return r, pubsub


def transcription(model: Model, r: Any, pubsub: Any) -> None:
    """Follow the pause protocol: pause -> unload -> paused, then vram_freed; resume -> load."""
    for msg in pubsub.listen():
        if msg["type"] != "message":
            continue
        if msg["channel"] == "transcription_pause":
            model.unload()
            r.publish("transcription_paused", json.dumps({"status": "paused",
                                                          "timestamp": time.time()}))
            while not model.released():
                time.sleep(0.02)
            r.publish("vram_freed", json.dumps({"status": "freed", "timestamp": time.time()}))
        elif msg["channel"] == "transcription_resume":
            model.load()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["ollama", "transcription"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="qwen2.5:32b")
    ap.add_argument("--model-mb", "--vram-mb", type=int, default=1000, dest="mb")
    ap.add_argument("--redis-url")
    args = ap.parse_args()
    model = Model(args.model, args.mb)
    model.load()  # both start with their model in VRAM, as the real ones do
    signal.signal(signal.SIGTERM, lambda *_: (model.unload(), sys.exit(0)))
    # Healthy only once it listens for pause requests, so none is published into the void.
    channels = subscribe(args.redis_url) if args.kind == "transcription" else None
    server = Server(("127.0.0.1", args.port), Handler)
    server.model = model
    if channels is not None:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        transcription(model, *channels)
    else:
        server.serve_forever()


if __name__ == "__main__":
    main()
