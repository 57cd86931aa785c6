"""Legacy `gpu_manager.py`, kept compatible on top of gpu-manager.

Drop this file where the old module was: existing imports keep working unmodified.
- v1 (`GPUManager`, `acquire_gpu`, ... `get_gpu_manager`): the same Redis mutex on the same
  key, `gpu_mutex`, which the gpu-manager daemon also takes, so the two exclude each other
  and each sees the other as the holder.
- v2 (`prepare_for_phase`, `use_service`, ... `get_gpu_manager_v2`): calls the daemon's HTTP
  API at `GPU_MANAGER_URL` (default http://127.0.0.1:8000) instead of its own key
  (`gpu_mutex_v2`), so every path sees the same GPU ownership.

This file imports only `redis` and the standard library, never the `gpu_manager` package it
shares its name with; see the README for how not to shadow the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis

log = logging.getLogger("gpu_manager")


def _http(method: str, url: str, body: dict[str, Any] | None = None,
          timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    token = os.environ.get("GPU_MANAGER_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None


# -- v1: the Redis mutex ------------------------------------------------------------------------
class GPUManager:
    def __init__(self) -> None:
        self.redis_url = os.environ.get("REDIS_URL", "redis://:123456@redis:6379/0")
        self.ollama_url = os.environ.get("OLLAMA_URL", "http://ollama:11434")
        self.lock_key = "gpu_mutex"
        self.default_timeout = 300
        self.redis = redis.Redis.from_url(self.redis_url, decode_responses=True)

    def force_unload_ollama(self, model: str = "qwen2.5:32b") -> bool:
        try:
            code, _ = _http("POST", f"{self.ollama_url}/api/generate",
                            {"model": model, "keep_alive": "0s"}, timeout=10)
        except (OSError, ValueError) as exc:
            log.warning("could not unload Ollama model %s: %s", model, exc)
            return False
        return code == 200

    @contextlib.contextmanager
    def acquire_gpu(self, service: str, timeout: int | None = None,
                    evict_ollama: bool = False) -> Iterator[bool]:
        if evict_ollama or service == "comfyui":
            self.force_unload_ollama()
        ttl = timeout or self.default_timeout
        if not self.redis.set(self.lock_key, service, nx=True, ex=ttl):
            holder = self.get_current_holder() or "unknown"
            raise Exception(f"GPU busy - held by {holder}")
        try:
            yield True
        finally:
            self.release_gpu(service)

    def try_acquire_gpu(self, service: str, timeout: int | None = None) -> bool:
        return bool(self.redis.set(self.lock_key, service, nx=True,
                                   ex=timeout or self.default_timeout))

    def release_gpu(self, service: str | None = None) -> bool:
        if service is None:
            return bool(self.redis.delete(self.lock_key))
        # compare-and-delete in one step: never delete a lock someone took after our TTL
        script = ("if redis.call('get', KEYS[1]) == ARGV[1] then "
                  "return redis.call('del', KEYS[1]) end return 0")
        return bool(self.redis.eval(script, 1, self.lock_key, service))

    def is_gpu_available(self) -> bool:
        return not self.redis.exists(self.lock_key)

    def get_current_holder(self) -> str | None:
        try:
            holder = self.redis.get(self.lock_key)
        except redis.RedisError:
            return None
        return str(holder) if holder is not None else None

    def get_gpu_status(self) -> dict[str, Any]:
        holder = self.get_current_holder()
        ttl = self.redis.ttl(self.lock_key) if holder is not None else None
        return {"available": holder is None, "holder": holder,
                "ttl_seconds": int(ttl) if ttl is not None and int(ttl) >= 0 else None}


_manager: GPUManager | None = None


def get_gpu_manager() -> GPUManager:
    global _manager  # noqa: PLW0603 - the legacy interface is a module-level singleton
    if _manager is None:
        _manager = GPUManager()
    return _manager


# -- v2: through the daemon's HTTP API ------------------------------------------------------
class GPUManagerV2:
    def __init__(self, url: str | None = None) -> None:
        self.url = (url or os.environ.get("GPU_MANAGER_URL", "http://127.0.0.1:8000")).rstrip("/")

    async def _call(self, method: str, path: str, timeout: float = 600) -> tuple[int, Any]:
        return await asyncio.to_thread(_http, method, f"{self.url}{path}", None, timeout)

    async def prepare_for_phase(self, phase: int) -> bool:
        code, body = await self._call("POST", f"/gpu/prepare-phase/{phase}")
        if code != 200:
            log.error("prepare_for_phase(%s) failed: %s", phase, body)
        return code == 200

    @contextlib.asynccontextmanager
    async def use_service(self, name: str, timeout: float | None = None) -> AsyncIterator[bool]:
        code, body = await self._call("POST", f"/gpu/service/{name}/start",
                                      timeout=timeout or 600)
        if code != 200:
            log.error("use_service(%s) could not start it: %s", name, body)
        yield code == 200

    async def release_all(self) -> bool:
        code, _ = await self._call("POST", "/gpu/release-all")
        return code == 200

    async def get_status(self) -> dict[str, Any]:
        _, body = await self._call("GET", "/gpu/status", timeout=10)
        return body if isinstance(body, dict) else {}

    async def get_lock_holder(self) -> str | None:
        lock = (await self.get_status()).get("lock") or {}
        holder = lock.get("holder")
        return str(holder) if holder is not None else None

    async def force_release_lock(self) -> bool:
        code, body = await self._call("POST", "/gpu/lock/release", timeout=10)
        return code == 200 and bool((body or {}).get("released"))

    async def get_vram_status(self) -> dict[str, Any]:
        vram = (await self.get_status()).get("vram")
        return vram if isinstance(vram, dict) else {}

    async def can_start_service(self, name: str) -> bool:
        code, _ = await self._call("POST", f"/gpu/service/{name}/start?dry_run=true",
                                   timeout=10)
        return code == 200


_manager_v2: GPUManagerV2 | None = None


def get_gpu_manager_v2() -> GPUManagerV2:
    global _manager_v2  # noqa: PLW0603 - the legacy interface is a module-level singleton
    if _manager_v2 is None:
        _manager_v2 = GPUManagerV2()
    return _manager_v2
