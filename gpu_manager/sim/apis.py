"""The sleep/wake HTTP APIs of real GPU servers, spoken by the stand-in (`--api KIND`).

Paths, methods, bodies and status codes follow the real servers, so the orchestrator's clients
can be tested in CI against the simulated GPU:

- vllm:     POST /sleep?level=1|2, POST /wake_up[?tags=weights&tags=kv_cache],
            GET /is_sleeping -> {"is_sleeping": bool},
            POST /collective_rpc {"method": "reload_weights"} (after a level 2 sleep)
- sglang:   POST|GET /release_memory_occupation {"tags": [...]?},
            POST|GET /resume_memory_occupation {"tags": [...]?}
- comfyui:  POST /free {"unload_models", "free_memory"} (answers first; a worker frees later),
            POST /prompt (loads the model, then answers; the prompt runs `--steps` steps),
            GET /history[/{prompt_id}], GET /ws (WebSocket progress), GET /system_stats
            (gpu_manager/sim/comfyui.py)
- ollama:   POST /api/generate|/api/chat {"model", "keep_alive": 0} unloads, without
            keep_alive 0 loads; GET /api/ps, GET /api/tags, GET /api/version, GET /
- tabbyapi: POST /v1/model/unload, POST /v1/model/load {"model_name"}, GET /v1/model

vllm, sglang, ollama and tabbyapi also serve OpenAI's GET /v1/models, POST
/v1/chat/completions, /v1/completions and /v1/embeddings (streamed or not; see
gpu_manager/sim/inference.py), each request counted busy on the simulated GPU.

A wake that does not fit answers 500 with the "CUDA out of memory" message and leaves the
service asleep. While asleep (vLLM sleeping, SGLang released, Ollama or TabbyAPI unloaded) the
inference routes answer 503 with the kind's error body; a real Ollama would load the model on
such a request instead, the stand-in leaves loading to /api/generate so a caller can tell.
Where a real server differs from "everything is an idempotent 200", the real one wins:
TabbyAPI answers 503 "No models are currently loaded." to GET /v1/model and to an unload while
nothing is loaded.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from gpu_manager.sim.base import MB, Api, Reply, Request, Route, Stream
from gpu_manager.sim.comfyui import ComfyUI
from gpu_manager.sim.inference import OpenAiRoutes, model_card
from gpu_manager.sim.memory import ModelMemory
from gpu_manager.sim.serving import Serving

__all__ = ["KINDS", "Api", "ComfyUI", "Reply", "Request", "Route", "Stream", "make_api",
           "model_parts"]

KINDS = ("vllm", "sglang", "comfyui", "ollama", "tabbyapi")


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


class Vllm(Api):
    kind = "vllm"
    asleep_message = "the engine is sleeping"

    def __init__(self, memory: ModelMemory, model: str, serving: Serving | None = None) -> None:
        super().__init__(memory, model, serving)
        self.routes.update(OpenAiRoutes(self, model, "vllm").routes())
        self.routes.update({
            ("POST", "/sleep"): self.sleep, ("POST", "/wake_up"): self.wake_up,
            ("GET", "/is_sleeping"): self.is_sleeping,
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


class Sglang(Api):
    kind = "sglang"
    asleep_message = "the memory occupation is released"

    def __init__(self, memory: ModelMemory, model: str, serving: Serving | None = None) -> None:
        super().__init__(memory, model, serving)
        self.routes.update(OpenAiRoutes(self, model, "sglang").routes())
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

    def __init__(self, memory: ModelMemory, model: str, serving: Serving | None = None) -> None:
        super().__init__(memory, model, serving)
        self.name = _ollama_name(model)
        self.asleep_message = f"model '{self.name}' is not loaded"
        self.routes.update(OpenAiRoutes(self, self.name, "library").routes())
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
    asleep_message = NOT_LOADED

    def __init__(self, memory: ModelMemory, model: str, serving: Serving | None = None) -> None:
        super().__init__(memory, model, serving)
        self.routes.update(OpenAiRoutes(self, model, "tabbyAPI").routes())
        self.routes.update({
            ("POST", "/v1/model/unload"): self.unload, ("POST", "/v1/model/load"): self.load,
            ("GET", "/v1/model"): self.current,
        })

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
        return Reply(200, model_card(self.model, "tabbyAPI"))


def make_api(kind: str, memory: ModelMemory, model: str,
             serving: Serving | None = None) -> Api:
    """The routes of server `kind`; `serving` sets its inference replies (default: say hello
    as `model`, instantly, counting requests in this process only)."""
    classes: dict[str, type[Api]] = {"vllm": Vllm, "sglang": Sglang, "comfyui": ComfyUI,
                                     "ollama": Ollama, "tabbyapi": TabbyApi}
    return classes[kind](memory, model, serving)
