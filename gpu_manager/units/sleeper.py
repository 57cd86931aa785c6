"""Put a service to sleep and wake it, in the API its server speaks (the `sleep:` block).

Each call is bounded (`timeout_s` for a sleep, `wake_timeout_s` for a wake) and never raises:
it answers (ok, what happened). An answer is only the server's word: the unit's caller
confirms a sleep on the GPU (its pids' VRAM drops), and a wake is followed by the health
check, as after a start.

- vllm:     POST /sleep?level=N, then GET /is_sleeping must say true; POST /wake_up (level 2
            dropped the weights: /wake_up?tags=weights, POST /collective_rpc reload_weights,
            /wake_up?tags=kv_cache). The server needs --enable-sleep-mode and
            VLLM_SERVER_DEV_MODE=1 for these routes.
- sglang:   POST /release_memory_occupation and /resume_memory_occupation {"tags"?}.
- comfyui:  POST /free {"unload_models": true, "free_memory": true}; it only sets a flag, the
            worker unloads later (the GPU confirms it). It has no wake: models load on the
            next prompt.
- ollama:   GET /api/ps, then /api/generate {"model", "keep_alive": 0} for each; waking loads
            `models` (or those it unloaded) with an empty /api/generate.
- tabbyapi: POST /v1/model/unload; POST /v1/model/load {"model_name"} (a server-sent event
            stream that ends with "finished" or an error).
- http:     the configured calls, and optionally the `asleep` check.
- pause:    the cooperative pause protocol (interfaces.md §3; units/strategies.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from gpu_manager.config import SleepConfig
from gpu_manager.redact import redact_url
from gpu_manager.units import strategies

GRACE_S = 1.0


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    detail: str
    # What the wake needs to know of the sleep (the models Ollama unloaded).
    memo: tuple[str, ...] = ()


class Sleeper(Protocol):
    async def sleep(self, name: str, cfg: SleepConfig, requester: str,
                    reason: str) -> Outcome: ...

    async def wake(self, name: str, cfg: SleepConfig, memo: tuple[str, ...]) -> Outcome: ...

    async def asleep(self, name: str, cfg: SleepConfig) -> bool | None:
        """Whether the service says it sleeps now; None when its API cannot say."""
        ...


class _Refused(Exception):
    """The server answered, but not what a successful call answers."""


class HttpSleeper:
    """The real thing: HTTP (and, for the pause protocol, Redis) to the service."""

    def __init__(self, client: httpx.AsyncClient | None = None,
                 redis_url: str | None = None, checkpoint: Sleeper | None = None) -> None:
        self.client = client or httpx.AsyncClient(trust_env=False, follow_redirects=False)
        self.redis_url = redis_url
        # `cuda-checkpoint`: through the driver, not HTTP (units/checkpoint_sleep.py)
        self.checkpoint = checkpoint

    async def sleep(self, name: str, cfg: SleepConfig, requester: str,
                    reason: str) -> Outcome:
        call = (self.checkpoint.sleep(name, cfg, requester, reason)
                if cfg.api == "cuda-checkpoint" and self.checkpoint is not None
                else self._sleep(cfg, requester, reason))
        return await self._bounded("sleep", cfg, cfg.timeout_s, call)

    async def wake(self, name: str, cfg: SleepConfig, memo: tuple[str, ...]) -> Outcome:
        call = (self.checkpoint.wake(name, cfg, memo)
                if cfg.api == "cuda-checkpoint" and self.checkpoint is not None
                else self._wake(cfg, memo))
        return await self._bounded("wake", cfg, cfg.wake_timeout_s, call)

    async def asleep(self, name: str, cfg: SleepConfig) -> bool | None:
        """vLLM: `GET /is_sleeping`; Ollama: no model loaded (`GET /api/ps`); `http`: its
        `asleep` check; `cuda-checkpoint`: the driver's state of its pids. The others have
        no way to say (None): the GPU will."""
        if cfg.api == "cuda-checkpoint":
            if self.checkpoint is None:
                return None
            try:
                async with asyncio.timeout(cfg.timeout_s + GRACE_S):
                    return await self.checkpoint.asleep(name, cfg)
            except TimeoutError:
                return None
        try:
            async with asyncio.timeout(cfg.timeout_s + GRACE_S):
                match cfg.api:
                    case "vllm":
                        state = (await self._call(cfg, "GET", "/is_sleeping",
                                                  cfg.timeout_s)).json()
                        value = state.get("is_sleeping") if isinstance(state, dict) else None
                        return value if isinstance(value, bool) else None
                    case "ollama":
                        ps = (await self._call(cfg, "GET", "/api/ps", cfg.timeout_s)).json()
                        return not ps.get("models") if isinstance(ps, dict) else None
                    case "http" if cfg.asleep is not None:
                        return await self._asleep(cfg)
                return None
        except (TimeoutError, _Refused, httpx.HTTPError, ValueError):
            return None

    async def _bounded(self, what: str, cfg: SleepConfig, timeout: float,
                       call: Any) -> Outcome:
        try:
            async with asyncio.timeout(timeout + GRACE_S):
                out: Outcome = await call
                return out
        except TimeoutError:
            return Outcome(False, f"{what} ({cfg.api}): no answer within {timeout:g}s")
        except _Refused as exc:
            return Outcome(False, redact_url(f"{what} ({cfg.api}): {exc}"))
        except httpx.HTTPError as exc:
            return Outcome(False, redact_url(f"{what} ({cfg.api}) failed: "
                                             f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # a bad URL, a bug in a transport: an answer, never a raise
            return Outcome(False, redact_url(f"{what} ({cfg.api}) failed: "
                                             f"{type(exc).__name__}: {exc}"))

    async def _call(self, cfg: SleepConfig, method: str, path: str, timeout: float,
                    body: Any = None, ok: tuple[int, ...] = ()) -> httpx.Response:
        assert cfg.url is not None
        url = cfg.url.rstrip("/") + path
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else None
        resp = await self.client.request(method, url, timeout=timeout, headers=headers,
                                         json=body if body is not None else None)
        if not (200 <= resp.status_code < 300 or resp.status_code in ok):
            text = resp.text[:200].strip()
            raise _Refused(f"{method} {path} answered {resp.status_code}"
                           + (f": {text}" if text else ""))
        return resp

    async def _sleep(self, cfg: SleepConfig, requester: str, reason: str) -> Outcome:
        t = cfg.timeout_s
        match cfg.api:
            case "vllm":
                await self._call(cfg, "POST", f"/sleep?level={cfg.level}", t)
                state = (await self._call(cfg, "GET", "/is_sleeping", t)).json()
                if not (isinstance(state, dict) and state.get("is_sleeping") is True):
                    raise _Refused(f"answered /sleep, but /is_sleeping says {state!r}")
                return Outcome(True, f"vLLM asleep (level {cfg.level})")
            case "sglang":
                body = {"tags": cfg.tags} if cfg.tags else {}
                await self._call(cfg, "POST", "/release_memory_occupation", t, body)
                return Outcome(True, "SGLang released its memory occupation")
            case "comfyui":
                await self._call(cfg, "POST", "/free", t,
                                 {"unload_models": True, "free_memory": True})
                return Outcome(True, "ComfyUI asked to free its models")
            case "ollama":
                ps = (await self._call(cfg, "GET", "/api/ps", t)).json()
                models = [str(m.get("name") or m.get("model")) for m in ps.get("models", [])]
                for model in models:
                    await self._call(cfg, "POST", "/api/generate", t,
                                     {"model": model, "keep_alive": 0})
                return Outcome(True, f"unloaded {', '.join(models) or 'no models'}",
                               tuple(models))
            case "tabbyapi":
                # 503 "No models are currently loaded.": already asleep
                await self._call(cfg, "POST", "/v1/model/unload", t, ok=(503,))
                return Outcome(True, "TabbyAPI unloaded its model")
            case "http":
                assert cfg.sleep is not None
                await self._call(cfg, cfg.sleep.method, cfg.sleep.path, t, cfg.sleep.body)
                if cfg.asleep is not None and not await self._asleep(cfg):
                    raise _Refused(f"answered sleep, but {cfg.asleep.path} says it is awake")
                return Outcome(True, f"{cfg.sleep.method} {cfg.sleep.path}")
            case "pause":
                assert cfg.pause is not None
                ok, detail = await strategies.pause(cfg.pause, self.redis_url, requester,
                                                    requester, reason, self.client)
                return Outcome(ok, detail)
        raise _Refused(f"unknown api {cfg.api!r}")  # pragma: no cover - config forbids it

    async def _asleep(self, cfg: SleepConfig) -> bool:
        check = cfg.asleep
        assert check is not None
        resp = await self._call(cfg, check.method, check.path, cfg.timeout_s)
        if check.field is None:
            return True
        value: Any = resp.json()
        for key in check.field.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        return bool(value == check.equals)

    async def _wake(self, cfg: SleepConfig, memo: tuple[str, ...]) -> Outcome:
        t = cfg.wake_timeout_s
        match cfg.api:
            case "vllm":
                if cfg.level == 1:
                    await self._call(cfg, "POST", "/wake_up", t)
                else:  # the weights were dropped: allocate them, reload them, then the cache
                    await self._call(cfg, "POST", "/wake_up?tags=weights", t)
                    await self._call(cfg, "POST", "/collective_rpc", t,
                                     {"method": "reload_weights"})
                    await self._call(cfg, "POST", "/wake_up?tags=kv_cache", t)
                return Outcome(True, "vLLM woke up")
            case "sglang":
                body = {"tags": cfg.tags} if cfg.tags else {}
                await self._call(cfg, "POST", "/resume_memory_occupation", t, body)
                return Outcome(True, "SGLang resumed its memory occupation")
            case "comfyui":
                return Outcome(True, "ComfyUI loads its models on the next prompt")
            case "ollama":
                models = list(cfg.models or memo)
                for model in models:
                    await self._call(cfg, "POST", "/api/generate", t, {"model": model})
                return Outcome(True, f"loaded {', '.join(models)}" if models
                               else "no model to load: Ollama loads on the first request")
            case "tabbyapi":
                resp = await self._call(cfg, "POST", "/v1/model/load", t,
                                        {"model_name": cfg.models[0]})
                _tabby_finished(resp.text)
                return Outcome(True, f"TabbyAPI loaded {cfg.models[0]}")
            case "http":
                assert cfg.wake is not None
                await self._call(cfg, cfg.wake.method, cfg.wake.path, t, cfg.wake.body)
                if cfg.asleep is not None and await self._asleep(cfg):
                    raise _Refused(f"answered wake, but {cfg.asleep.path} says it is asleep")
                return Outcome(True, f"{cfg.wake.method} {cfg.wake.path}")
            case "pause":
                assert cfg.pause is not None
                ok, detail = await strategies.resume(cfg.pause, self.redis_url,
                                                     "gpu-manager", self.client)
                return Outcome(ok, detail)
        raise _Refused(f"unknown api {cfg.api!r}")  # pragma: no cover

    async def aclose(self) -> None:
        await self.client.aclose()


def _tabby_finished(stream: str) -> None:
    """TabbyAPI streams its load progress; the last event says finished, or an error."""
    last: Any = None
    for line in stream.splitlines():
        if line.startswith("data:"):
            try:
                last = json.loads(line[5:].strip())
            except ValueError:
                continue
    if not isinstance(last, dict) or last.get("status") != "finished":
        raise _Refused(f"model load did not finish: {last!r}")
