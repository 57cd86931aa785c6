"""Daemon settings from the environment (GPU_MANAGER_*); the inventory lives in YAML."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gpu_manager.config import default_config_dir
from gpu_manager.paths import state_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPU_MANAGER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # With a token, every mutating endpoint needs `Authorization: Bearer <token>`.
    token: SecretStr | None = None
    # Comma-separated. Host names (or host:port) a loopback-bound daemon also answers to;
    # others are refused, so a DNS-rebinding page cannot reach it. On another bind: if set,
    # the only names (besides loopback ones) it answers to.
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # Comma-separated. Browser origins (scheme://host[:port]) besides the daemon's own that
    # may call mutating endpoints; `*` allows any and must be given explicitly.
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()
    config_dir: Path = Field(default_factory=default_config_dir)
    state_dir: Path = Field(default_factory=state_dir)
    # Without a Redis URL the GPU lock is in-process.
    redis_url: str | None = None
    lock_key: str = "gpu_mutex"  # shared with legacy gpu_manager.py v1 on purpose
    lock_ttl_ms: int = Field(default=30_000, ge=1000)
    # How long a transition may wait for a GPU lock someone else holds before answering 423.
    lock_wait_s: float = Field(default=0.0, ge=0)
    # After stopping services, how long to wait for their VRAM to come back.
    reclaim_timeout_s: float = Field(default=30.0, gt=0)
    # `graph`: each step waits only for the steps it needs (the planner's edges); `serial`:
    # every step waits for all before it (stops, then starts one by one), as before the
    # graph; kept for comparison (bench/transitions.py) and as a fallback.
    plan_mode: Literal["graph", "serial"] = "graph"
    log_level: str = "INFO"
    # Operations queued or running at once through the API (`wait=false` ones pile up):
    # beyond this a request answers 429 with the queue length.
    max_pending_operations: int = Field(default=64, ge=1)
    # How long an operation may wait for its turn (the transitions before it); past it, it
    # ends 429 `queue_timeout` with Retry-After. A mutating request's answer takes at most
    # this plus its plan's own deadline (`deadline_s` in the answer).
    queue_wait_s: float = Field(default=20.0, gt=0, le=3600)
    # Largest request body taken (413 beyond): the API's bodies are a few hundred bytes.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Bodies the front door forwards (`/v1`, `/svc`: audio, images): a larger bound of
    # their own. `/v1` reads the body for its `model` field; `/svc` streams it up.
    proxy_max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Native services' logs roll over past this size, checked while they run, keeping
    # `child_log_backups` old files (name.log.1 ... name.log.N).
    child_log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    child_log_backups: int = Field(default=3, ge=1)
    child_log_check_s: float = Field(default=5.0, gt=0)
    # On SIGTERM/SIGINT: leave managed services running for the next daemon to adopt, or stop.
    on_shutdown: Literal["leave", "stop"] = "leave"
    # On SIGTERM: how long operations in flight may go on before they are cancelled.
    shutdown_timeout_s: float = Field(default=20.0, ge=0, le=600)

    # The event stream: how many recent events a reconnecting client can get back
    # (`Last-Event-ID`), how far one client may fall behind before it is sent a `gap`, the
    # keep-alive ping interval (proxies cut idle connections, often at 60 s), and how long one
    # write to a client that stopped reading may block before its stream is closed.
    event_buffer: int = Field(default=1000, ge=1, le=1_000_000)
    sse_queue: int = Field(default=1000, ge=1, le=1_000_000)
    sse_ping_s: float = Field(default=15.0, gt=0, le=3600)
    sse_send_timeout_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _comma_separated(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(x.strip() for x in v.split(",") if x.strip())
        return v

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def token_value(self) -> str | None:
        value = self.token.get_secret_value() if self.token is not None else None
        return value or None
