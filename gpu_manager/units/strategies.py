"""Preemption strategies besides stop: Ollama eviction and cooperative pause.

The planner decides *what* to free; these decide *how*. Each returns (ok, detail); a False
makes the orchestrator fall back to stopping the service, and say so.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from gpu_manager.aio import within
from gpu_manager.config import OllamaEvict, PauseConfig
from gpu_manager.redact import redact_url

STALE_S = 30.0  # the pause protocol ignores acknowledgements older than this


async def ollama_evict(cfg: OllamaEvict, client: httpx.AsyncClient) -> tuple[bool, str]:
    """Unload every loaded model: GET /api/ps, then keep_alive 0 for each."""
    base = cfg.url.rstrip("/")
    try:
        resp = await client.get(f"{base}/api/ps", timeout=cfg.timeout_s)
        resp.raise_for_status()
        models = [m.get("name") or m.get("model") for m in resp.json().get("models", [])]
        for model in models:
            r = await client.post(f"{base}/api/generate", timeout=cfg.timeout_s,
                                  json={"model": model, "keep_alive": 0})
            r.raise_for_status()
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return False, redact_url(f"Ollama eviction failed: {type(exc).__name__}: {exc}")
    return True, f"unloaded {', '.join(map(str, models)) or 'no models'}"


def _message(raw: object) -> dict[str, object]:
    try:
        data = json.loads(str(raw))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


async def redis_pause(cfg: PauseConfig, url: str, task_id: str, new_owner: str,
                      reason: str) -> tuple[bool, str]:
    """The transcription pause protocol (interfaces.md §3) over Redis pub/sub."""
    import redis.asyncio as aioredis  # noqa: PLC0415 - only pausable services need redis
    from redis.exceptions import RedisError  # noqa: PLC0415

    r = aioredis.from_url(url, decode_responses=True, socket_timeout=5)
    pubsub = r.pubsub()
    try:
        await pubsub.subscribe(cfg.paused_channel, cfg.freed_channel)
        await r.set(cfg.state_key, "pausing")
        t0 = time.time()
        await r.publish(cfg.pause_channel, json.dumps(
            {"reason": reason, "task_id": task_id, "timestamp": t0}))
        if not await _await_message(pubsub, cfg.paused_channel, "paused", cfg.ack_timeout_s):
            await r.set(cfg.state_key, cfg.owner_name)
            return False, f"no {cfg.paused_channel!r} within {cfg.ack_timeout_s:g}s"
        if not await _await_message(pubsub, cfg.freed_channel, "freed", cfg.freed_timeout_s):
            await r.set(cfg.state_key, cfg.owner_name)
            return False, f"paused, but no {cfg.freed_channel!r} within {cfg.freed_timeout_s:g}s"
        await r.set(cfg.state_key, new_owner)
        await r.publish(cfg.owner_channel, new_owner)
        return True, f"paused over Redis in {time.time() - t0:.2f}s"
    except RedisError as exc:
        # these details reach the operation log and clients: no password from the URL
        return False, f"pause over Redis ({redact_url(url)}) failed: {redact_url(str(exc))}"
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await r.aclose()


async def _await_message(pubsub: Any, channel: str, status: str,
                         timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=min(left, 1.0))
        if msg is None or msg.get("channel") != channel:
            continue
        data = _message(msg.get("data"))
        stamp = data.get("timestamp")
        if isinstance(stamp, int | float) and time.time() - stamp > STALE_S:
            continue  # an old acknowledgement from an earlier round
        if data.get("status") == status:
            return True
    return False


async def redis_resume(cfg: PauseConfig, url: str, task_id: str) -> tuple[bool, str]:
    import redis.asyncio as aioredis  # noqa: PLC0415
    from redis.exceptions import RedisError  # noqa: PLC0415

    r = aioredis.from_url(url, decode_responses=True, socket_timeout=5)
    try:
        await r.publish(cfg.resume_channel, json.dumps({"task_id": task_id,
                                                        "timestamp": time.time()}))
        await r.set(cfg.state_key, cfg.owner_name)
        await r.publish(cfg.owner_channel, cfg.owner_name)
        return True, "resumed over Redis"
    except RedisError as exc:
        return False, f"resume over Redis ({redact_url(url)}) failed: {redact_url(str(exc))}"
    finally:
        await r.aclose()


async def http_call(url: str | None, task_id: str, reason: str, client: httpx.AsyncClient,
                    timeout: float) -> tuple[bool, str]:
    if url is None:
        return False, "no URL configured"
    try:
        resp = await client.post(url, json={"task_id": task_id, "reason": reason},
                                 timeout=timeout)
    except httpx.HTTPError as exc:
        return False, redact_url(f"POST {url} failed: {type(exc).__name__}: {exc}")
    if not 200 <= resp.status_code < 300:
        return False, f"POST {redact_url(url)} answered {resp.status_code}"
    return True, f"POST {redact_url(url)}: {resp.status_code}"


async def pause(cfg: PauseConfig, redis_url: str | None, task_id: str, new_owner: str,
                reason: str, client: httpx.AsyncClient) -> tuple[bool, str]:
    if cfg.protocol == "http":
        return await http_call(cfg.pause_url, task_id, reason, client, cfg.ack_timeout_s)
    url = cfg.redis_url or redis_url
    if url is None:
        return False, "pause over Redis needs a Redis URL (preempt.redis_url or the daemon's)"
    return await within(redis_pause(cfg, url, task_id, new_owner, reason),
                        cfg.ack_timeout_s + cfg.freed_timeout_s + 5)


async def resume(cfg: PauseConfig, redis_url: str | None, task_id: str,
                 client: httpx.AsyncClient) -> tuple[bool, str]:
    if cfg.protocol == "http":
        return await http_call(cfg.resume_url, task_id, "gpu released", client, 10)
    url = cfg.redis_url or redis_url
    if url is None:
        return False, "no Redis URL"
    return await redis_resume(cfg, url, task_id)
