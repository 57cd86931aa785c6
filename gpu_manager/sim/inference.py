"""OpenAI-compatible inference on the stand-ins: what vLLM, SGLang, Ollama and TabbyAPI serve.

- GET /v1/models: {"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}
- POST /v1/chat/completions, POST /v1/completions: a fixed text ("Hello from <name> ..."), one
  word a token, `max_tokens` (or `max_completion_tokens`) capping the count, `--token-ms` per
  token; `stream: true` sends (chat: a chunk with the role alone, then) one server-sent event
  per token as it is produced, then a chunk with the finish reason (and the usage when
  `stream_options.include_usage`), then [DONE]; beyond `--context-tokens` (prompt words plus
  `max_tokens`): 400 `context_length_exceeded` in OpenAI's shape, before any stream
- POST /v1/embeddings: a small fixed-size unit vector per input, derived from the input (the
  same text always gets the same vector); `encoding_format` "float" or "base64" (what the
  openai SDK asks for by default: little-endian float32)

The shapes are OpenAI's, so the official SDK parses them; `model` echoes the request. While the
model is asleep every inference route answers 503 with the kind's error body. Each request
counts as in flight (the stand-in shows busy on the simulated GPU) until its last byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

from gpu_manager.sim.base import Api, Reply, Request, Route, Stream

EMBEDDING_DIM = 8
MAX_EMBEDDING_DIM = 4096
SSE = "text/event-stream; charset=utf-8"


def model_card(model_id: str, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": owned_by}


def _words(value: Any) -> int:
    """A rough token count of a prompt, message content or embedding input: its words."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(1 if isinstance(v, int) else _words(v) for v in value)
    if isinstance(value, dict):  # a content part {"type": "text", "text": ...} or a message
        return _words(value.get("text")) + _words(value.get("content"))
    return 0


def _sleep_until(deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)  # the simulated generation time is the point here


def _unit_vector(item: Any, dim: int) -> list[float]:
    digest = hashlib.shake_256(json.dumps(item).encode()).digest(2 * dim)
    raw = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dim}H", digest)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


class OpenAiRoutes:
    """The OpenAI routes of one stand-in; `model_id` is what /v1/models lists."""

    def __init__(self, api: Api, model_id: str, owned_by: str) -> None:
        self.api = api
        self.model_id = model_id
        self.owned_by = owned_by

    def routes(self) -> dict[tuple[str, str], Route]:
        return {
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/embeddings"): self.embeddings,
        }

    def models(self, req: Request) -> Reply:
        return Reply(200, {"object": "list", "data": [model_card(self.model_id, self.owned_by)]})

    # -- shared checks ------------------------------------------------------------------------
    def _body(self, req: Request) -> dict[str, Any] | Reply:
        """The request's JSON object, or the refusal: asleep (503) or not an object (400)."""
        asleep = self.api.asleep_reply()
        if asleep is not None:
            return asleep
        if not isinstance(req.body, dict):
            return self.api.error(400, "the body must be a JSON object")
        return req.body

    def _limit(self, body: dict[str, Any]) -> int | Reply | None:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is None or (isinstance(limit, int) and not isinstance(limit, bool)
                             and limit >= 0):
            return limit
        return self.api.error(400, "max_tokens must be a non-negative integer")

    def _reply_tokens(self) -> list[str]:
        """The whole fixed reply, a word a token (each after the first with its space)."""
        words = (f"Hello from {self.api.serving.name}, a stand-in {self.api.kind} server "
                 "answering with a fixed text.").split()
        return [w if i == 0 else f" {w}" for i, w in enumerate(words)]

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        return model if isinstance(model, str) and model else self.model_id

    # -- chat and text completions ------------------------------------------------------------
    def chat(self, req: Request) -> Reply:
        return self._generate(req, chat=True)

    def completions(self, req: Request) -> Reply:
        return self._generate(req, chat=False)

    def _generate(self, req: Request, chat: bool) -> Reply:
        body = self._body(req)
        if isinstance(body, Reply):
            return body
        asked = body.get("messages") if chat else body.get("prompt")
        if chat and (not isinstance(asked, list) or not asked):
            return self.api.error(400, "messages must be a non-empty list")
        if not chat and not isinstance(asked, str | list):
            return self.api.error(400, "prompt must be a string or a list")
        limit = self._limit(body)
        if isinstance(limit, Reply):
            return limit
        prompt_tokens = _words(asked)
        too_long = self._beyond_context(prompt_tokens, limit, chat)
        if too_long is not None:
            return too_long
        full = self._reply_tokens()
        tokens = full if limit is None else full[:limit]
        finish = "length" if len(tokens) < len(full) else "stop"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": self._model(body)}
        busy = self.api.serving.busy
        if body.get("stream") is True:
            options = body.get("stream_options")
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            busy.start()  # ended by the stream's close, however the stream ends
            chunks = self._chunks(head, chat, tokens, finish, usage if with_usage else None)
            return Reply(200, content_type=SSE, headers={"Cache-Control": "no-cache"},
                         stream=Stream(_events(chunks), busy.end))
        with busy.serving():
            time.sleep(self.api.serving.token_s * len(tokens))  # the generation time
        text = "".join(tokens)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return Reply(200, {**head, "object": "chat.completion" if chat else "text_completion",
                           "choices": [choice], "usage": usage})

    def _beyond_context(self, prompt: int, limit: int | None, chat: bool) -> Reply | None:
        """The 400 for a request beyond the model's context, in OpenAI's shape and words (what
        llama.cpp's server answers, and vLLM says): checked before any stream begins."""
        context = self.api.serving.context_tokens
        asked = prompt + (limit or 0)
        if context is None or (asked <= context and prompt < context):
            return None
        where = "in the messages" if chat else "in your prompt"
        return Reply(400, {"error": {
            "message": f"This model's maximum context length is {context} tokens. However, "
                       f"you requested {asked} tokens ({prompt} {where}, {limit or 0} in the "
                       "completion). Please reduce the length of the messages or completion.",
            "type": "invalid_request_error", "param": "messages" if chat else "prompt",
            "code": "context_length_exceeded"}})

    def _chunks(self, head: dict[str, Any], chat: bool, tokens: list[str], finish: str,
                usage: dict[str, int] | None) -> Iterator[dict[str, Any]]:
        obj = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, first: bool, reason: str | None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            return {**obj, "choices": [choice]}

        start = time.monotonic()
        if chat:
            # the role alone first, before any token, as the real servers send it (llama.cpp's
            # server verified: {"role": "assistant"}, no content; vLLM's the same with "")
            yield chunk(None, True, None)
        for i, token in enumerate(tokens):
            # paced from the start, so the stream's length does not drift with the writes
            _sleep_until(start + (i + 1) * self.api.serving.token_s)
            yield chunk(token, False, None)
        yield chunk(None, False, finish)
        if usage is not None:
            yield {**obj, "choices": [], "usage": usage}

    # -- embeddings ---------------------------------------------------------------------------
    def embeddings(self, req: Request) -> Reply:
        body = self._body(req)
        if isinstance(body, Reply):
            return body
        raw = body.get("input")
        # one text, one tokenised text, or a list of either
        if isinstance(raw, str) or (isinstance(raw, list) and raw
                                    and all(isinstance(v, int) for v in raw)):
            inputs: list[Any] = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(v, str | list) for v in raw):
            inputs = raw
        else:
            return self.api.error(400, "input must be a string, a list of strings or tokens")
        dim = body.get("dimensions", EMBEDDING_DIM)
        if isinstance(dim, bool) or not isinstance(dim, int) \
                or not 1 <= dim <= MAX_EMBEDDING_DIM:
            return self.api.error(400, f"dimensions must be 1..{MAX_EMBEDDING_DIM}")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return self.api.error(400, "encoding_format must be 'float' or 'base64'")
        with self.api.serving.busy.serving():
            time.sleep(self.api.serving.token_s * len(inputs))  # one "token" per input
        data = []
        for i, item in enumerate(inputs):
            vector = _unit_vector(item, dim)
            encoded: Any = vector if fmt == "float" else base64.b64encode(
                struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = _words(inputs)
        return Reply(200, {"object": "list", "data": data, "model": self._model(body),
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _events(chunks: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    for obj in chunks:
        yield f"data: {json.dumps(obj)}\n\n".encode()
    yield b"data: [DONE]\n\n"
