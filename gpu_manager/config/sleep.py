"""The `sleep:` block of a service, and the deprecated `evict:`/`preempt:` it replaces."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _http_url(v: str) -> str:
    """An http(s) URL the daemon can call: a host, and a port in range. The regex alone let
    `http://127.0.0.1:99999/health` through, and the HTTP client only choked on it at the
    first health check."""
    try:
        parts = urlsplit(v)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError as exc:
        raise ValueError(f"invalid URL {v!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {v!r}: needs http:// or https:// and a host")
    if port == 0:
        raise ValueError(f"invalid URL {v!r}: port 0")
    return v


HttpUrl = Annotated[str, AfterValidator(_http_url)]


class OllamaEvict(_Strict):
    """Deprecated `evict:`: read as `sleep: {api: ollama, url, timeout_s}`."""

    strategy: Literal["ollama"]
    url: HttpUrl = Field(default="http://127.0.0.1:11434", pattern=r"^https?://")
    timeout_s: float = Field(default=10.0, gt=0, le=300)


class PauseConfig(_Strict):
    """Cooperative pause: ask the service to offload its model instead of stopping it.

    `redis`: the pub/sub protocol of the transcription service (interfaces.md §3);
    `http`: POST `pause_url`, then POST `resume_url` when the GPU is released.
    A pause not acknowledged within `ack_timeout_s` (and VRAM not freed within
    `freed_timeout_s`) falls back to a stop. As `preempt:` (deprecated) it is read as
    `sleep: {api: pause, pause: {...}, wake_when_free: true}`.
    """

    strategy: Literal["pause"] = "pause"
    protocol: Literal["redis", "http"] = "redis"
    redis_url: str | None = None  # default: the daemon's GPU_MANAGER_REDIS_URL
    pause_channel: str = "transcription_pause"
    paused_channel: str = "transcription_paused"
    freed_channel: str = "vram_freed"
    resume_channel: str = "transcription_resume"
    owner_channel: str = "gpu_owner"
    state_key: str = "gpu_state"
    owner_name: str = "transcription"
    pause_url: HttpUrl | None = Field(default=None, pattern=r"^https?://")
    resume_url: HttpUrl | None = Field(default=None, pattern=r"^https?://")
    ack_timeout_s: float = Field(default=10.0, gt=0, le=600)
    freed_timeout_s: float = Field(default=60.0, gt=0, le=600)

    @model_validator(mode="after")
    def _urls(self) -> PauseConfig:
        if self.protocol == "http" and not (self.pause_url and self.resume_url):
            raise ValueError("protocol 'http' needs pause_url and resume_url")
        return self


class HttpCall(_Strict):
    """One request of the generic `http` sleep API, relative to `sleep.url`."""

    method: Literal["GET", "POST", "PUT", "DELETE"] = "POST"
    path: str = Field(pattern=r"^/[^\s]*$")
    body: dict[str, Any] | list[Any] | None = None


class AsleepCheck(_Strict):
    """How to tell the service is asleep: GET `path`; asleep when the JSON answer's `field`
    (dotted for nested keys) equals `equals`, or, without `field`, when it answers 2xx."""

    method: Literal["GET", "POST"] = "GET"
    path: str = Field(pattern=r"^/[^\s]*$")
    field: str | None = None
    equals: Any = True


SleepApi = Literal["vllm", "sglang", "comfyui", "ollama", "tabbyapi", "http", "pause",
                   "cuda-checkpoint"]


class SleepConfig(_Strict):
    """Free the VRAM without stopping the process, and take it back without a cold start.

    The planner puts a service with `sleep:` to sleep where it would stop it to make room
    (and stops it anyway when the room needs its residual too). A sleep counts once the GPU
    shows it: its processes hold at most `residual_mb` within `timeout_s`, else it is
    stopped and the plan says so. Starting it wakes it (`wake_timeout_s`), then the health
    check runs as after a start.
    """

    api: SleepApi
    # The server's base URL (http://host:port); the pause protocol over Redis needs none.
    url: HttpUrl | None = Field(default=None, pattern=r"^https?://")
    level: Literal[1, 2] = 1  # vLLM: 1 keeps the weights in host RAM, 2 drops them
    tags: list[str] | None = None  # SGLang: release/resume only these (default: all)
    # Ollama: the models to load at wake (default: the ones unloaded at sleep);
    # TabbyAPI: the model to load at wake (required).
    models: list[str] = Field(default_factory=list)
    timeout_s: float = Field(default=30.0, gt=0, le=600)  # the call and the GPU's evidence
    wake_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    # The name of an environment variable (of the daemon) holding an API key, sent as
    # `Authorization: Bearer <key>` (TabbyAPI's admin key, SGLang's --api-key). The key
    # itself never goes in this file, nor in logs or answers.
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # The most it keeps on the GPU while asleep (CUDA context, buffers); None: a quarter of
    # vram_mb, at most 1024 MB. Counted by the planner until it is measured.
    residual_mb: int | None = Field(default=None, ge=0)
    # The host RAM its sleep holds (weights copied to RAM: vLLM level 1, a CPU backup); the
    # planner counts it against `host:` until the daemon has measured it (the pids' RSS
    # after the sleep less before). None: nothing declared (0 until measured).
    host_ram_mb: int | None = Field(default=None, ge=0)
    # Wake it after a release (a stop, release-all, the end of a client lease) once it fits
    # without moving anything (the pause protocol's resume: a 24/7 service that lends the
    # GPU and takes it back). Not after a phase: a phase that let it sleep meant it.
    wake_when_free: bool = False
    # api: http
    sleep: HttpCall | None = None
    wake: HttpCall | None = None
    asleep: AsleepCheck | None = None
    # api: pause
    pause: PauseConfig | None = None

    @model_validator(mode="after")
    def _needs(self) -> SleepConfig:
        if self.api == "pause":
            if self.pause is None:
                raise ValueError("api 'pause' needs a pause: block (the protocol's settings)")
        elif self.api == "cuda-checkpoint":
            pass  # the driver's, through the service's pids: no URL
        elif self.url is None:
            raise ValueError(f"api {self.api!r} needs url (the server's base URL)")
        if self.api == "http" and (self.sleep is None or self.wake is None):
            raise ValueError("api 'http' needs sleep: and wake: ({method, path, body})")
        if self.api == "tabbyapi" and len(self.models) != 1:
            raise ValueError("api 'tabbyapi' needs models: [the model to load at wake]")
        for key in ("sleep", "wake", "asleep"):
            if self.api != "http" and getattr(self, key) is not None:
                raise ValueError(f"{key}: is for api 'http' only")
        if self.api != "pause" and self.pause is not None:
            raise ValueError("pause: is for api 'pause' only")
        if self.api != "vllm" and self.level != 1:
            raise ValueError("level is for api 'vllm' only")
        if self.api != "sglang" and self.tags is not None:
            raise ValueError("tags is for api 'sglang' only")
        return self


def legacy_sleep(data: dict[str, Any]) -> dict[str, Any]:
    """Fold the deprecated `evict:` and `preempt:` keys into `sleep:` (the loader warns)."""
    evict, preempt = data.get("evict"), data.get("preempt")
    if evict is None and preempt is None:
        # `evict: null` / `preempt: null` were accepted before: still nothing
        return {k: v for k, v in data.items() if k not in ("evict", "preempt")}
    keys = [k for k in ("evict", "preempt", "sleep") if data.get(k) is not None]
    if len(keys) > 1:
        raise ValueError(f"{' and '.join(keys)} are one concept: keep only sleep:")
    out = {k: v for k, v in data.items() if k not in ("evict", "preempt")}
    if isinstance(evict, dict):
        ev = OllamaEvict.model_validate(evict)
        out["sleep"] = {"api": "ollama", "url": ev.url, "timeout_s": ev.timeout_s}
    elif isinstance(preempt, dict):
        pause = PauseConfig.model_validate(preempt)
        out["sleep"] = {"api": "pause", "pause": pause, "wake_when_free": True,
                        "timeout_s": min(600.0, pause.ack_timeout_s + pause.freed_timeout_s
                                         + 5)}
    else:
        raise ValueError("evict:/preempt: must be a mapping")
    return out


