"""The sleep/wake HTTP APIs of real GPU servers, spoken by the stand-in (`--api KIND`).

Paths, methods, bodies and status codes follow the real servers, so the orchestrator's clients
can be tested in CI against the simulated GPU:

- vllm:     POST /sleep?level=1|2, POST /wake_up[?tags=weights&tags=kv_cache],
            GET /is_sleeping -> {"is_sleeping": bool}, GET /v1/models,
            POST /collective_rpc {"method": "reload_weights"} (after a level 2 sleep)
- sglang:   POST|GET /release_memory_occupation {"tags": [...]?},
            POST|GET /resume_memory_occupation {"tags": [...]?}
- comfyui:  POST /free {"unload_models", "free_memory"} (answers first; a worker frees later),
            POST /prompt (loads the model, then answers), GET /system_stats
- ollama:   POST /api/generate|/api/chat {"model", "keep_alive": 0} unloads, without
            keep_alive 0 loads; GET /api/ps, GET /api/tags, GET /api/version, GET /
- tabbyapi: POST /v1/model/unload, POST /v1/model/load {"model_name"}, GET /v1/model,
            GET /v1/models

A wake that does not fit answers 500 with the "CUDA out of memory" message and leaves the
service asleep. Where a real server differs from "everything is an idempotent 200", the real
one wins: TabbyAPI answers 503 "No models are currently loaded." to GET /v1/model and to an
unload while nothing is loaded.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gpu_manager.sim.memory import DeviceOOM, ModelMemory

KINDS = ("vllm", "sglang", "comfyui", "ollama", "tabbyapi")
MB = 2**20


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # the parsed JSON body, None when there was none


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    body: Any = None  # JSON-encoded; None sends an empty body (what FastAPI's Response() does)
    raw: bytes | None = None  # sent as is, with `content_type`
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[Request], Reply]


def model_parts(kind: str, free_mb: int, weights_mb: int | None) -> dict[str, int]:
    """Split what sleep releases into the parts the server can sleep and wake by tag."""
    if kind not in ("vllm", "sglang"):
        return {"model": free_mb}
    weights = free_mb // 2 if weights_mb is None else min(weights_mb, free_mb)
    parts = {"weights": weights, "kv_cache": free_mb - weights}
    if kind == "sglang":
        parts["cuda_graph"] = 0  # a tag SGLang accepts; its memory is counted in kv_cache here
    return parts


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class Api:
    """Routes of one server kind; `memory` does the sleeping and waking."""

    kind: str = ""
    error_key = "error"  # FastAPI servers (TabbyAPI) say "detail"

    def __init__(self, memory: ModelMemory, model: str) -> None:
        self.memory = memory
        self.model = model
        self.routes: dict[tuple[str, str], Route] = {}

    def start(self) -> None:
        """Start background workers, if the server has any."""

    def error(self, code: int, message: str) -> Reply:
        return Reply(code, {self.error_key: message})

    def wake_or_500(self, tags: list[str] | None = None) -> Reply | None:
        """Wake; None when it worked, else the reply a CUDA OOM or a bad tag gets."""
        try:
            self.memory.wake(tags)
        except DeviceOOM as exc:
            return self.error(500, str(exc))
        except ValueError as exc:
            return self.error(400, str(exc))
        return None

    def handle(self, req: Request) -> Reply:
        route = self.routes.get((req.method, req.path))
        if route is not None:
            return route(req)
        if any(path == req.path for _, path in self.routes):
            return self.error(405, "Method Not Allowed")
        return self.error(404, "Not Found")


class Vllm(Api):
    kind = "vllm"

    def __init__(self, memory: ModelMemory, model: str) -> None:
        super().__init__(memory, model)
        self.routes.update({
            ("POST", "/sleep"): self.sleep, ("POST", "/wake_up"): self.wake_up,
            ("GET", "/is_sleeping"): self.is_sleeping, ("GET", "/v1/models"): self.models,
            ("POST", "/collective_rpc"): self.collective_rpc,
        })

    def sleep(self, req: Request) -> Reply:
        level = req.query.get("level", ["1"])[0]
        if level not in ("1", "2"):
            return self.error(400, f"invalid sleep level {level!r}: 1 or 2")
        # Level 1 keeps the weights in host RAM; level 2 drops them (waking reloads them).
        self.memory.sleep(discard=("weights",) if level == "2" else ())
        return Reply(200)

    def wake_up(self, req: Request) -> Reply:
        return self.wake_or_500(req.query.get("tags") or None) or Reply(200)

    def collective_rpc(self, req: Request) -> Reply:
        """After a level 2 sleep the weights are reloaded with `reload_weights` between the
        wake of the weights and that of the KV cache; the stand-in's wake already did it."""
        method = req.body.get("method") if isinstance(req.body, dict) else None
        if not isinstance(method, str):
            return self.error(400, "method is required")
        return Reply(200, {"results": [None]})

    def is_sleeping(self, req: Request) -> Reply:
        return Reply(200, {"is_sleeping": self.memory.asleep})

    def models(self, req: Request) -> Reply:
        return Reply(200, {"object": "list", "data": [
            {"id": self.model, "object": "model", "owned_by": "vllm"}]})


class Sglang(Api):
    kind = "sglang"

    def __init__(self, memory: ModelMemory, model: str) -> None:
        super().__init__(memory, model)
        for method in ("GET", "POST"):  # SGLang routes both with api_route
            self.routes[(method, "/release_memory_occupation")] = self.release
            self.routes[(method, "/resume_memory_occupation")] = self.resume

    @staticmethod
    def _tags(req: Request) -> list[str] | None:
        tags = req.body.get("tags") if isinstance(req.body, dict) else None
        return list(tags) if isinstance(tags, list) else None

    def release(self, req: Request) -> Reply:
        try:
            self.memory.sleep(self._tags(req))
        except ValueError as exc:
            return self.error(400, str(exc))
        return Reply(200)

    def resume(self, req: Request) -> Reply:
        return self.wake_or_500(self._tags(req)) or Reply(200)


class ComfyUI(Api):
    """/free only sets flags; the prompt worker frees the memory later, as ComfyUI's does."""

    kind = "comfyui"

    def __init__(self, memory: ModelMemory, model: str) -> None:
        super().__init__(memory, model)
        self.routes.update({
            ("POST", "/free"): self.free, ("POST", "/prompt"): self.prompt,
            ("GET", "/system_stats"): self.system_stats,
        })
        self._flags = threading.Condition()
        self._free_pending = False
        self._number = 0

    def start(self) -> None:
        threading.Thread(target=self._worker, name="prompt-worker", daemon=True).start()

    def _worker(self) -> None:
        while True:
            with self._flags:
                self._flags.wait_for(lambda: self._free_pending)
                self._free_pending = False
            self.memory.sleep()

    def free(self, req: Request) -> Reply:
        body = req.body if isinstance(req.body, dict) else {}
        # Either flag unloads the models in ComfyUI (free_memory implies unload_models).
        if body.get("unload_models") or body.get("free_memory"):
            with self._flags:
                self._free_pending = True
                self._flags.notify()
        return Reply(200)

    def prompt(self, req: Request) -> Reply:
        # Real ComfyUI answers on queueing and loads while executing; the stand-in answers
        # once the model is back, so a caller can tell the wake finished (or hit an OOM).
        failed = self.wake_or_500()
        if failed is not None:
            return failed
        number, self._number = self._number, self._number + 1
        return Reply(200, {"prompt_id": str(uuid.uuid4()), "number": number, "node_errors": {}})

    def system_stats(self, req: Request) -> Reply:
        total, free = self.memory.backend.device_mb() or (0, 0)
        held = self.memory.held_mb() * MB
        return Reply(200, {
            "system": {"os": "posix", "comfyui_version": "stand-in", "embedded_python": False},
            "devices": [{"name": "cuda:0 stand-in", "type": "cuda", "index": 0,
                         "vram_total": total * MB, "vram_free": free * MB,
                         "torch_vram_total": held, "torch_vram_free": 0}],
        })


def _is_zero_keep_alive(value: Any) -> bool:
    """keep_alive 0 in any of Ollama's spellings: 0, 0.0, "0", "0s", "0m"."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        number = value.strip().rstrip("smh") or "x"
        try:
            return float(number) == 0
        except ValueError:
            return False
    return False


def _ollama_name(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


class Ollama(Api):
    kind = "ollama"

    def __init__(self, memory: ModelMemory, model: str) -> None:
        super().__init__(memory, model)
        self.name = _ollama_name(model)
        self.routes.update({
            ("POST", "/api/generate"): self.generate, ("POST", "/api/chat"): self.generate,
            ("GET", "/api/ps"): self.ps, ("GET", "/api/tags"): self.tags,
            ("GET", "/api/version"): lambda req: Reply(200, {"version": "0.0.0-stand-in"}),
            ("GET", "/"): lambda req: Reply(200, raw=b"Ollama is running",
                                            content_type="text/plain; charset=utf-8"),
        })

    def generate(self, req: Request) -> Reply:
        body = req.body if isinstance(req.body, dict) else {}
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self.error(400, "model is required")
        if _ollama_name(model) != self.name:
            return self.error(404, f"model '{model}' not found")
        chat = req.path == "/api/chat"
        answer: dict[str, Any] = {"model": model, "created_at": _now_iso()}
        answer.update({"message": {"role": "assistant", "content": ""}} if chat
                      else {"response": ""})
        if _is_zero_keep_alive(body.get("keep_alive")):
            self.memory.sleep()  # Ollama answers once the runner has let the model go
            return Reply(200, {**answer, "done": True, "done_reason": "unload"})
        failed = self.wake_or_500()
        if failed is not None:
            return failed
        asked = body.get("messages") if chat else body.get("prompt")
        return Reply(200, {**answer, "done": True, "done_reason": "stop" if asked else "load"})

    def _card(self) -> dict[str, Any]:
        size = sum(self.memory.parts.values()) * MB
        return {"name": self.name, "model": self.name, "size": size, "digest": "stand-in",
                "details": {"format": "gguf", "family": "stand-in"}}

    def ps(self, req: Request) -> Reply:
        if self.memory.asleep:
            return Reply(200, {"models": []})
        size_vram = (self.memory.held_mb() - self.memory.residual_mb) * MB
        return Reply(200, {"models": [{**self._card(), "size_vram": size_vram,
                                       "expires_at": "2318-01-01T00:00:00Z"}]})

    def tags(self, req: Request) -> Reply:
        return Reply(200, {"models": [{**self._card(), "modified_at": _now_iso()}]})


class TabbyApi(Api):
    kind = "tabbyapi"
    error_key = "detail"
    NOT_LOADED = "No models are currently loaded."

    def __init__(self, memory: ModelMemory, model: str) -> None:
        super().__init__(memory, model)
        self.routes.update({
            ("POST", "/v1/model/unload"): self.unload, ("POST", "/v1/model/load"): self.load,
            ("GET", "/v1/model"): self.current, ("GET", "/v1/models"): self.models,
        })

    def _card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": int(time.time()),
                "owned_by": "tabbyAPI"}

    def unload(self, req: Request) -> Reply:
        if self.memory.asleep:  # TabbyAPI's check_model_container refuses the unload
            return self.error(503, self.NOT_LOADED)
        self.memory.sleep()
        return Reply(200, None, raw=b"null")  # FastAPI's answer for a handler returning None

    def load(self, req: Request) -> Reply:
        body = req.body if isinstance(req.body, dict) else {}
        name = body.get("model_name") or body.get("name")
        if not name:
            return self.error(400, "A model name was not provided for load.")
        if name != self.model:
            return self.error(400, "Could not find the model path for load. "
                                   "Check model name or config.yml?")
        failed = self.wake_or_500()
        if failed is not None:
            return failed
        # TabbyAPI streams load progress as server-sent events, ending with "finished".
        events = [{"model_type": "model", "module": m, "modules": 1, "status": s}
                  for m, s in ((0, "processing"), (1, "finished"))]
        data = "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events).encode()
        return Reply(200, raw=data, content_type="text/event-stream; charset=utf-8")

    def current(self, req: Request) -> Reply:
        if self.memory.asleep:
            return self.error(503, self.NOT_LOADED)
        return Reply(200, self._card())

    def models(self, req: Request) -> Reply:
        return Reply(200, {"object": "list", "data": [self._card()]})


def make_api(kind: str, memory: ModelMemory, model: str) -> Api:
    classes: dict[str, type[Api]] = {"vllm": Vllm, "sglang": Sglang, "comfyui": ComfyUI,
                                     "ollama": Ollama, "tabbyapi": TabbyApi}
    return classes[kind](memory, model)
