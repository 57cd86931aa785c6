"""`GPUClient`: how an ML service asks gpu-manager for the GPU (interfaces.md §3).

Drop-in for the existing client: same names, same behaviour (it never raises from
`request_gpu`; it falls back to the CPU when the coordinator is unreachable or says no), plus
it sends the priority and VRAM it needs, and renews its lease while held. Against an old
coordinator without `/gpu/acquire` it speaks the older `/gemma/request` form.

    from gpu_manager.client import GPURequestPriority, get_gpu_client

    client = get_gpu_client()
    async with client.gpu_context("ctgan", GPURequestPriority.BACKGROUND) as on_gpu:
        device = "cuda" if on_gpu else "cpu"
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import httpx
from loguru import logger

DEFAULT_URL = "http://gpu-coordinator:8002"


class GPURequestPriority(IntEnum):
    IMMEDIATE = 1
    BACKGROUND = 2


class GPUClientError(Exception):
    pass


class GPUAcquisitionTimeout(GPUClientError):
    pass


class GPULeaseLost(GPUClientError):
    """The GPU was taken from this client while it held it (the coordinator's GPU lock went
    to someone else): stop using the GPU, and acquire again to go on."""


class GPUCoordinatorUnavailable(GPUClientError):
    pass


@dataclass
class GPUAcquisitionResult:
    acquired: bool
    task_id: str | None = None
    error: str | None = None
    acquisition_time_ms: float = 0.0


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


class GPUClient:
    def __init__(self, coordinator_url: str | None = None, timeout_seconds: float | None = None,
                 retry_attempts: int = 2, fallback_to_cpu: bool | None = None,
                 service_auth: str | None = None, *, vram_mb: int | None = None,
                 ttl_s: float = 60.0, service_id: str | None = None,
                 device: int | None = None,
                 on_lost: Callable[[str], object] | None = None, fleet: bool = False) -> None:
        self.coordinator_url = (coordinator_url or os.environ.get("GPU_COORDINATOR_URL")
                                or DEFAULT_URL).rstrip("/")
        self.timeout_seconds = (timeout_seconds if timeout_seconds is not None
                                else float(os.environ.get("GPU_REQUEST_TIMEOUT", "15")))
        self.retry_attempts = retry_attempts
        self.fallback_to_cpu = (fallback_to_cpu if fallback_to_cpu is not None
                                else _env_bool("GPU_FALLBACK_TO_CPU", True))
        self.enabled = _env_bool("GPU_ENABLED", True)
        self.service_auth = service_auth
        self.vram_mb = vram_mb
        self.ttl_s = ttl_s
        # Several GPUs: the card to ask for (None: any that fits), and once acquired what to
        # set CUDA_VISIBLE_DEVICES to (the granted card's UUID).
        self.device = device
        self.cuda_visible_devices: str | None = None
        # A fleet (`coordinator_url` is any of its daemons): the lease is placed on the host
        # that has room; it is renewed and released at that host's daemon (`host_url`).
        self.fleet = fleet
        self.host: str | None = None
        self.host_url: str | None = None
        self.service_id = service_id or os.environ.get("SERVICE_NAME", "ml-service")
        # Called (with why) when the coordinator says the lease was lost while held; a
        # coroutine function is awaited. `lost` keeps the reason; `raise_if_lost()` raises.
        self.on_lost = on_lost
        self.lost: str | None = None
        self._task_id: str | None = None
        self._legacy = False
        self._renewer: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def is_acquired(self) -> bool:
        return self._task_id is not None

    @property
    def current_task_id(self) -> str | None:
        return self._task_id

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            headers = {"X-Service-ID": self.service_id, "X-Request-Source": "gpu-client"}
            if self.service_auth:
                headers["X-Service-Token"] = self.service_auth
            self._http = httpx.AsyncClient(base_url=self.coordinator_url, headers=headers,
                                           timeout=self.timeout_seconds + 5, trust_env=False)
        return self._http

    # -- acquire / release --------------------------------------------------------------------
    async def request_gpu(self, engine_name: str,
                          priority: GPURequestPriority = GPURequestPriority.IMMEDIATE
                          ) -> GPUAcquisitionResult:
        """Ask for the GPU; never raises. `acquired=False` (with why) means: use the CPU."""
        t0 = time.monotonic()
        if not self.enabled:
            return GPUAcquisitionResult(False, None, "GPU disabled (GPU_ENABLED=false)")
        if self.is_acquired:
            return GPUAcquisitionResult(True, self._task_id, None, 0.0)
        self.lost = None
        # One session id for every attempt: a retry after a timeout joins the acquire the
        # coordinator may still be running for it, instead of starting a second one.
        task_id = f"ml-{engine_name}-{secrets.token_hex(4)}"
        error = "no attempt made"
        unanswered = False  # an attempt got no answer: the coordinator may still grant it
        for attempt in range(self.retry_attempts + 1):
            try:
                ok, error = await self._acquire(task_id, engine_name, int(priority))
            except httpx.TransportError as exc:
                unanswered = unanswered or not isinstance(exc, httpx.ConnectError)
                error = f"coordinator unreachable at {self.coordinator_url}: {exc}"
                if attempt < self.retry_attempts:
                    await asyncio.sleep(0.5 * (attempt + 1))
                continue
            except Exception as exc:  # never raise from request_gpu
                error = f"{type(exc).__name__}: {exc}"
                break
            if ok:
                self._task_id = task_id
                self._renewer = asyncio.create_task(self._renew_loop(task_id))
                return GPUAcquisitionResult(True, task_id, None, (time.monotonic() - t0) * 1000)
            break  # the coordinator answered no: retrying would only wait longer
        if unanswered:
            await self._give_up(task_id)
        if self.fallback_to_cpu:
            logger.info(f"GPU not acquired for {engine_name} ({error}); using the CPU")
        return GPUAcquisitionResult(False, None, error, (time.monotonic() - t0) * 1000)

    async def _acquire(self, task_id: str, engine: str, priority: int) -> tuple[bool, str]:
        http = self._client()
        if not self._legacy:
            body: dict[str, Any] = {
                "session_id": task_id, "requester": engine, "priority": priority,
                "timeout_ms": int(self.timeout_seconds * 1000), "ttl_s": self.ttl_s,
                "metadata": {"service": self.service_id}}
            if not self.fleet:  # a pid names a process of this host: not of a fleet's host
                # this process's memory on the GPU is the lease's, not foreign use
                body["pid"] = os.getpid()
            if self.vram_mb is not None:
                body["vram_mb"] = self.vram_mb
            if self.device is not None and not self.fleet:
                body["device"] = self.device
            resp = await http.post("/fleet/acquire" if self.fleet else "/gpu/acquire",
                                   json=body)
            if resp.status_code not in (404, 405) or self.fleet:
                data = resp.json()
                self.cuda_visible_devices = data.get("cuda_visible_devices")
                self.host, self.host_url = data.get("host"), data.get("url")
                # a fleet's refusal is the error shape: its detail names every host
                why = data.get("detail") if self.fleet and not data.get("success") else None
                return bool(data.get("success")), str(why or data.get("error")
                                                      or resp.status_code)
            self._legacy = True  # an older coordinator: speak its form from now on
        resp = await http.post("/gemma/request", json={
            "task_id": task_id, "messages": [], "context": [], "max_tokens": 0,
            "temperature": 0.0})
        if resp.status_code == 200:
            return True, ""
        try:
            return False, str(resp.json().get("message") or resp.status_code)
        except ValueError:
            return False, f"HTTP {resp.status_code}"

    def _at(self, path: str) -> str:
        """Where the lease lives: its host's daemon in a fleet, else the coordinator."""
        return f"{self.host_url.rstrip('/')}{path}" if self.fleet and self.host_url else path

    async def _give_up(self, task_id: str) -> None:
        """After attempts that got no answer, the coordinator may still grant the session
        to nobody: release it (which also cancels an acquire still in flight)."""
        try:  # in a fleet: wherever it went (every host is asked)
            await self._client().post("/fleet/release" if self.fleet else "/gpu/release",
                                      timeout=5, json={"session_id": task_id} if self.fleet
                                      else {"session_id": task_id, "requester": self.service_id})
        except httpx.HTTPError as exc:
            logger.info(f"could not release {task_id} after giving up (its TTL ends it): "
                        f"{exc}")

    async def _renew_loop(self, task_id: str) -> None:
        if self._legacy:
            return  # the old protocol has no renewal
        while True:
            await asyncio.sleep(max(self.ttl_s / 3, 0.1))
            try:
                resp = await self._client().post(self._at("/gpu/renew"), json={
                    "session_id": task_id, "requester": self.service_id})
                if resp.status_code == 409 and resp.json().get("lost"):
                    await self._lost(task_id, str(resp.json().get("error") or "lost"))
                    return
                if resp.status_code == 404:
                    logger.warning(f"GPU lease {task_id} is gone (expired or taken back)")
                    self._task_id = None
                    return
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning(f"GPU lease renewal failed, retrying: {exc}")

    async def _lost(self, task_id: str, why: str) -> None:
        logger.error(f"GPU lease {task_id} was lost: {why}; stop using the GPU")
        self.lost = why
        if self._task_id == task_id:
            self._task_id = None
        if self.on_lost is not None:
            try:
                outcome = self.on_lost(why)
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception as exc:  # the callback's failure is the caller's, logged
                logger.opt(exception=exc).error(f"GPUClient on_lost callback raised: {exc}")

    def raise_if_lost(self) -> None:
        """Raise GPULeaseLost if the lease held was taken away (check between GPU steps)."""
        if self.lost is not None:
            raise GPULeaseLost(self.lost)

    async def release_gpu(self) -> bool:
        task_id, self._task_id = self._task_id, None
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if task_id is None:
            return False
        try:
            if self._legacy:
                resp = await self._client().post(f"/gemma/release/{task_id}", json={})
            else:
                resp = await self._client().post(self._at("/gpu/release"), json={
                    "session_id": task_id, "requester": self.service_id})
        except httpx.HTTPError as exc:
            logger.warning(f"GPU release failed (the lease expires by its TTL): {exc}")
            return False
        return resp.status_code == 200

    @contextlib.asynccontextmanager
    async def gpu_context(self, engine_name: str,
                          priority: GPURequestPriority = GPURequestPriority.IMMEDIATE
                          ) -> AsyncIterator[bool]:
        result = await self.request_gpu(engine_name, priority)
        try:
            yield result.acquired
        finally:
            if result.acquired:
                await self.release_gpu()

    # -- health and status --------------------------------------------------------------------
    async def check_coordinator_health(self) -> bool:
        try:
            return (await self._client().get("/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def get_gpu_status(self) -> dict[str, Any]:
        try:
            resp = await self._client().get("/status")
            data: dict[str, Any] = resp.json()
            return data
        except (httpx.HTTPError, ValueError) as exc:
            raise GPUCoordinatorUnavailable(f"cannot read {self.coordinator_url}/status: {exc}"
                                            ) from exc

    async def close(self) -> None:
        if self.is_acquired:
            await self.release_gpu()
        if self._http is not None:
            await self._http.aclose()
            self._http = None


_client: GPUClient | None = None


def get_gpu_client(service_auth: str | None = None) -> GPUClient:
    global _client  # noqa: PLW0603 - the interface is a module-level singleton
    if _client is None:
        _client = GPUClient(service_auth=service_auth)
    return _client


async def init_gpu_client(service_auth: str | None = None) -> GPUClient:
    client = get_gpu_client(service_auth)
    if not await client.check_coordinator_health():
        logger.warning(f"GPU coordinator at {client.coordinator_url} is not answering; "
                       "GPU requests will fall back to the CPU")
    return client


async def shutdown_gpu_client() -> None:
    global _client  # noqa: PLW0603 - the interface is a module-level singleton
    if _client is not None:
        await _client.close()
        _client = None
