"""ComfyUI on the stand-in: its free API, its prompt queue, its history and its WebSocket.

- POST /free {"unload_models", "free_memory"}: answers at once; the prompt worker frees the
  memory later (after the prompt it is running, as ComfyUI's worker checks its flags)
- POST /prompt {"prompt": {...}, "client_id"?}: loads the model (the stand-in answers once it
  is back, so a caller can tell the wake finished or hit an OOM), queues the prompt and answers
  {"prompt_id", "number", "node_errors": {}}; the worker runs it for `--steps` steps of
  `--token-ms` each, busy on the simulated GPU while it does
- GET /history/{prompt_id}: {prompt_id: {"prompt", "outputs", "status"}} once it ran, {} before;
  GET /history: every finished prompt
- GET /ws?clientId=X: a WebSocket; "status" (with sid X) on connect, then for every prompt
  run "execution_start", "progress" per step (node "3", the KSampler of the default workflow),
  "executed" (node "9", SaveImage, with its images), "execution_success", "executing" with
  node null, and a "status" with the new queue length, broadcast to every connection (real
  ComfyUI sends a prompt's progress to its client_id only; the stand-in keeps it simple). The
  history is written before "executing" null, so a client that fetches it then finds it.
  A model that no longer fits when a queued prompt starts fails it: "execution_error", and
  the history says status_str "error".
- GET /system_stats
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from io import BufferedIOBase
from typing import Any

from gpu_manager.sim.base import MB, Api, Reply, Request
from gpu_manager.sim.memory import DeviceOOM, ModelMemory
from gpu_manager.sim.serving import Serving
from gpu_manager.sim.websocket import Hub, WebSocket, handshake_headers

SAMPLER_NODE = "3"
OUTPUT_NODE = "9"


@dataclass(frozen=True, slots=True)
class _Job:
    number: int
    prompt_id: str
    prompt: dict[str, Any]
    extra: dict[str, Any]


def _ms() -> int:
    return int(time.time() * 1000)


class ComfyUI(Api):
    kind = "comfyui"

    def __init__(self, memory: ModelMemory, model: str, serving: Serving | None = None) -> None:
        super().__init__(memory, model, serving)
        self.routes.update({
            ("POST", "/free"): self.free, ("POST", "/prompt"): self.prompt,
            ("GET", "/system_stats"): self.system_stats, ("GET", "/history"): self.history,
            ("GET", "/ws"): self.ws,
        })
        self.hub = Hub()
        # The worker's inbox: queued prompts and the free flag, under one condition.
        self._flags = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running = 0
        self._free_pending = False
        self._number = 0
        self._history: dict[str, dict[str, Any]] = {}
        self._images = 0

    def start(self) -> None:
        threading.Thread(target=self._worker, name="prompt-worker", daemon=True).start()

    def handle(self, req: Request) -> Reply:
        if req.method == "GET" and req.path.startswith("/history/"):
            return self.history(req, req.path[len("/history/"):])
        return super().handle(req)

    # -- the worker ---------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            with self._flags:
                self._flags.wait_for(lambda: bool(self._queue) or self._free_pending)
                job = self._queue.popleft() if self._queue else None
                self._running = 1 if job is not None else 0
            if job is not None:
                self._run(job)
                with self._flags:
                    self._running = 0
                self.hub.broadcast(self._status())  # the queue changed, as ComfyUI tells
            with self._flags:  # ComfyUI checks its flags after each prompt
                free, self._free_pending = self._free_pending, False
            if free:
                self.memory.sleep()

    def _queue_remaining(self) -> int:
        with self._flags:
            return len(self._queue) + self._running

    def _status(self, sid: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"status": {"exec_info": {
            "queue_remaining": self._queue_remaining()}}}
        if sid is not None:
            data["sid"] = sid
        return {"type": "status", "data": data}

    def _run(self, job: _Job) -> None:
        pid = job.prompt_id
        self.hub.broadcast({"type": "execution_start",
                            "data": {"prompt_id": pid, "timestamp": _ms()}})
        try:
            self.memory.wake()  # freed since it was queued: ComfyUI loads it while executing
        except DeviceOOM as exc:
            self._finish(job, {}, "error", [("execution_error", {
                "prompt_id": pid, "node_id": SAMPLER_NODE, "exception_message": str(exc),
                "timestamp": _ms()})])
            self.hub.broadcast({"type": "execution_error", "data": {
                "prompt_id": pid, "node_id": SAMPLER_NODE, "exception_message": str(exc)}})
            return
        steps, step_s = self.serving.steps, self.serving.token_s
        with self.serving.busy.serving():
            start = time.monotonic()
            for i in range(1, steps + 1):
                left = start + i * step_s - time.monotonic()
                if left > 0:
                    time.sleep(left)  # the sampling time is what this simulates
                self.hub.broadcast({"type": "progress", "data": {
                    "value": i, "max": steps, "prompt_id": pid, "node": SAMPLER_NODE}})
        self._images += 1
        images = [{"filename": f"ComfyUI_{self._images:05d}_.png", "subfolder": "",
                   "type": "output"}]
        self.hub.broadcast({"type": "executed", "data": {
            "node": OUTPUT_NODE, "display_node": OUTPUT_NODE, "output": {"images": images},
            "prompt_id": pid}})
        self._finish(job, {OUTPUT_NODE: {"images": images}}, "success",
                     [("execution_start", {"prompt_id": pid}),
                      ("execution_success", {"prompt_id": pid, "timestamp": _ms()})])
        self.hub.broadcast({"type": "execution_success",
                            "data": {"prompt_id": pid, "timestamp": _ms()}})
        self.hub.broadcast({"type": "executing", "data": {"node": None, "prompt_id": pid}})

    def _finish(self, job: _Job, outputs: dict[str, Any], status: str,
                messages: list[tuple[str, dict[str, Any]]]) -> None:
        entry = {
            # ComfyUI's queue item: (number, prompt_id, prompt, extra_data, outputs_to_execute)
            "prompt": [job.number, job.prompt_id, job.prompt, job.extra, [OUTPUT_NODE]],
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success",
                       "messages": [list(m) for m in messages]},
            "meta": {node: {"node_id": node, "display_node": node} for node in outputs},
        }
        with self._flags:
            self._history[job.prompt_id] = entry

    # -- routes -------------------------------------------------------------------------------
    def free(self, req: Request) -> Reply:
        body = req.body if isinstance(req.body, dict) else {}
        # Either flag unloads the models in ComfyUI (free_memory implies unload_models).
        if body.get("unload_models") or body.get("free_memory"):
            with self._flags:
                self._free_pending = True
                self._flags.notify()
        return Reply(200)

    def prompt(self, req: Request) -> Reply:
        body = req.body if isinstance(req.body, dict) else {}
        prompt = body.get("prompt")
        if not isinstance(prompt, dict):
            return Reply(400, {"error": {"type": "no_prompt", "message": "No prompt provided",
                                         "details": "", "extra_info": {}},
                               "node_errors": {}})
        # Real ComfyUI answers on queueing and loads while executing; the stand-in answers
        # once the model is back, so a caller can tell the wake finished (or hit an OOM).
        failed = self.wake_or_500()
        if failed is not None:
            return failed
        given = body.get("extra_data")
        extra: dict[str, Any] = given if isinstance(given, dict) else {}
        client_id = body.get("client_id")
        if isinstance(client_id, str):
            extra = {**extra, "client_id": client_id}
        prompt_id = body.get("prompt_id")
        if not isinstance(prompt_id, str) or not prompt_id:
            prompt_id = str(uuid.uuid4())
        with self._flags:
            number, self._number = self._number, self._number + 1
            self._queue.append(_Job(number, prompt_id, prompt, extra))
            self._flags.notify()
        return Reply(200, {"prompt_id": prompt_id, "number": number, "node_errors": {}})

    def history(self, req: Request, prompt_id: str | None = None) -> Reply:
        with self._flags:
            if prompt_id is None:
                return Reply(200, dict(self._history))
            entry = self._history.get(prompt_id)
        return Reply(200, {} if entry is None else {prompt_id: entry})

    def ws(self, req: Request) -> Reply:
        headers = handshake_headers(req.headers)
        if headers is None:
            return self.error(400, "expected a WebSocket upgrade")
        sid = (req.query.get("clientId") or [""])[0] or uuid.uuid4().hex

        def run(reader: BufferedIOBase, writer: BufferedIOBase) -> None:
            ws = WebSocket(reader, writer)
            try:
                self.hub.add(ws, first=self._status(sid))
            except OSError:
                return
            try:
                ws.serve()
            finally:
                self.hub.remove(ws)

        return Reply(101, headers=headers, upgrade=run)

    def system_stats(self, req: Request) -> Reply:
        total, free = self.memory.backend.device_mb() or (0, 0)
        held = self.memory.held_mb() * MB
        return Reply(200, {
            "system": {"os": "posix", "comfyui_version": "stand-in", "embedded_python": False},
            "devices": [{"name": "cuda:0 stand-in", "type": "cuda", "index": 0,
                         "vram_total": total * MB, "vram_free": free * MB,
                         "torch_vram_total": held, "torch_vram_free": 0}],
        })
