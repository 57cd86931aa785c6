"""The `serve:` block of a service: the daemon's front door forwards requests to it.

A service with `serve:` is reached through the daemon (`/v1/...` by the body's `model`,
`/svc/<name>/...` for any path): a request for a stopped service starts it, for a sleeping one
wakes it, and while requests are in flight nothing of lower or equal priority releases it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from gpu_manager.config.sleep import HttpUrl, _Strict

# OpenAI model names: what people write (`llama3.1:8b`, `Qwen/Qwen2.5-7B-Instruct`).
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}$")


class QueueConfig(_Strict):
    """Requests waiting for the service (a start, a wake, a free slot)."""

    # More waiting than this: 429 with Retry-After (at least 1: a request for a stopped
    # service waits for its start).
    max: int = Field(default=64, ge=1, le=100000)
    # Waiting longer than this: 503 with Retry-After (a start that takes longer still
    # goes on; the next request finds it ready).
    timeout_s: float = Field(default=120.0, gt=0, le=3600)


class IdleConfig(_Strict):
    """Release the service when it is idle by measure, not by a timer alone."""

    # No request through the front door for this long...
    after_s: float = Field(gt=0, le=86400)
    # ...and its own processes' GPU utilisation below this all that time.
    below_util_pct: int = Field(default=5, ge=1, le=100)
    # What releasing means; `sleep` falls back to `stop` for a service that cannot sleep.
    then: Literal["sleep", "stop"] = "sleep"


class ServeConfig(_Strict):
    # The upstream base URL the front door forwards to (`http://127.0.0.1:8001`).
    url: HttpUrl = Field(pattern=r"^https?://")
    # OpenAI-style model names this service answers on `/v1`.
    models: list[str] = Field(default_factory=list, max_length=256)
    # Requests forwarded at once; the rest wait in the queue.
    max_concurrent: int = Field(default=8, ge=1, le=10000)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    # How long requests in flight may finish before a release (a higher-priority start, a
    # phase, a stop) goes on; then they are cut with a clean error.
    drain_s: float = Field(default=30.0, ge=0, le=3600)
    # The daemon's environment variable holding the upstream's own API key, sent as
    # `Authorization: Bearer`; the client's Authorization is never forwarded.
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    idle: IdleConfig | None = None
    # Bounds on the upstream: connecting, and the gap between two chunks of an answer
    # (a long generation streams; a silent upstream past this is cut, 504).
    connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    chunk_timeout_s: float = Field(default=300.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @field_validator("models")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if not MODEL_NAME.match(m)]
        if bad:
            raise ValueError(f"invalid model name(s) {', '.join(map(repr, bad))}")
        dup = sorted({m for m in v if v.count(m) > 1})
        if dup:
            raise ValueError(f"models lists {', '.join(dup)} more than once")
        return v
