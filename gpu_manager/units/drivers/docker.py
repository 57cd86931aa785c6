"""Docker services through the Docker SDK; every SDK call runs off the event loop.

One `DockerEngine` per daemon owns the client and a single `die` event stream, so a container
that dies is noticed as soon as dockerd says so (no polling). A driver stops only the
container id it started or adopted, and reports "stopped" only after inspecting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from typing import Any

import docker
import docker.errors
import docker.types
import requests
from loguru import logger

from gpu_manager.aio import within
from gpu_manager.config import DockerService
from gpu_manager.units.drivers.base import DriverError, ExitInfo, ExitWatch

LABEL = "gpu-manager.service"


class DockerEngine:
    def __init__(self, base_url: str | None = None, timeout: float = 60) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()
        self._watchers: dict[str, list[asyncio.Future[ExitInfo]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._closed = False

    def _connect(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    client = (docker.DockerClient(base_url=self.base_url, timeout=int(self.timeout))
                              if self.base_url else docker.from_env(timeout=int(self.timeout)))
                    client.ping()
                except Exception as exc:
                    raise DriverError(f"Docker engine unreachable: {exc}") from exc
                self._client = client
            return self._client

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a blocking SDK call in a thread; map 'engine unreachable' to a DriverError."""
        def run() -> Any:
            client = self._connect()
            return fn(client, *args, **kwargs)

        try:
            return await asyncio.to_thread(run)
        except DriverError:
            raise
        except Exception as exc:
            if isinstance(exc, requests.exceptions.ConnectionError):
                raise DriverError(f"Docker engine unreachable: {exc}") from exc
            raise

    # -- die events ---------------------------------------------------------------------------
    async def watch(self, container_id: str) -> asyncio.Future[ExitInfo]:
        """A future resolved when `container_id` dies (checked against its state at once)."""
        self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[ExitInfo] = self._loop.create_future()
        self._watchers.setdefault(container_id, []).append(fut)
        if self._thread is None or not self._thread.is_alive():
            await asyncio.to_thread(self._connect)
            self._thread = threading.Thread(target=self._pump, name="docker-events", daemon=True)
            self._thread.start()
        # It may have died before the stream saw it.
        state = await self.call(lambda c: c.api.inspect_container(container_id)["State"])
        if not state.get("Running"):
            self._resolve(container_id, ExitInfo(int(state.get("ExitCode", 0)),
                                                 detail="not running"))
        return fut

    def _resolve(self, container_id: str, info: ExitInfo) -> None:
        for fut in self._watchers.pop(container_id, []):
            if not fut.done():
                fut.set_result(info)

    def _pump(self) -> None:
        backoff = 0.5
        while not self._closed:
            try:
                client = self._connect()
                self._stream = client.events(
                    decode=True, filters={"type": "container", "event": ["die"]},
                    since=int(time.time()) - 1)
                backoff = 0.5
                for ev in self._stream:
                    cid = ev.get("id") or ev.get("Actor", {}).get("ID")
                    code = ev.get("Actor", {}).get("Attributes", {}).get("exitCode")
                    info = ExitInfo(int(code) if code is not None else None,
                                    detail="container died")
                    if self._loop is not None and cid in self._watchers:
                        self._loop.call_soon_threadsafe(self._resolve, cid, info)
            except Exception as exc:
                if self._closed:
                    return
                logger.warning(f"Docker event stream broke ({exc}); reconnecting in {backoff:g}s")
                time.sleep(backoff)  # a plain thread, off the event loop
                backoff = min(backoff * 2, 10)
                with self._lock:
                    self._client = None

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()


class DockerDriver(ExitWatch):
    def __init__(self, name: str, cfg: DockerService, engine: DockerEngine) -> None:
        self.name = name
        self.cfg = cfg
        self.engine = engine
        self.container_name = cfg.container.lstrip("/")
        self.container_id: str | None = None
        self._exit: asyncio.Future[ExitInfo] | None = None

    # -- launch -------------------------------------------------------------------------------
    def _get_or_create(self, client: Any) -> Any:
        errors = docker.errors
        try:
            return client.containers.get(self.container_name)
        except errors.NotFound:
            pass
        if not self.cfg.image:
            raise DriverError(f"container {self.container_name!r} does not exist and no image is "
                              "configured to create it")
        requests_ = []
        if self.cfg.device_request is not None:
            dr = self.cfg.device_request
            requests_.append(docker.types.DeviceRequest(
                driver=dr.driver, count=dr.count, device_ids=dr.device_ids or [],
                capabilities=dr.capabilities))
        kwargs = {"name": self.container_name, "command": self.cfg.command,
                  "environment": self.cfg.env, "labels": {LABEL: self.name},
                  "network_mode": self.cfg.network_mode, "device_requests": requests_ or None,
                  "detach": True}
        try:
            try:
                return client.containers.create(self.cfg.image, **kwargs)
            except errors.ImageNotFound:
                logger.info(f"{self.name}: pulling {self.cfg.image}")
                client.images.pull(self.cfg.image)
                return client.containers.create(self.cfg.image, **kwargs)
        except errors.APIError as exc:
            if exc.status_code == 409:
                raise DriverError(f"name conflict: a container named {self.container_name!r} "
                                  f"already exists ({exc.explanation})") from exc
            raise DriverError(f"cannot create {self.container_name!r}: {exc.explanation}"
                              ) from exc

    async def start(self) -> None:
        errors = docker.errors

        def launch(client: Any) -> str:
            container = self._get_or_create(client)
            if container.status != "running":
                try:
                    container.start()
                except errors.APIError as exc:
                    raise DriverError(f"cannot start container {self.container_name!r}: "
                                      f"{exc.explanation}") from exc
            return str(container.id)

        self.container_id = await self.engine.call(launch)
        self._exit = await self.engine.watch(self.container_id)

    # -- observe ------------------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        if not self.running() or self.container_id is None:
            return None
        return {"kind": "docker", "id": self.container_id, "container": self.container_name}

    async def pids(self) -> list[int]:
        if self.container_id is None or not self.running():
            return []
        cid = self.container_id

        def top(client: Any) -> list[int]:
            out = client.api.top(cid)
            col = out["Titles"].index("PID")
            return [int(row[col]) for row in out["Processes"] or []]

        try:
            result: list[int] = await self.engine.call(top)
        except Exception:
            return []
        return result

    # -- stop ---------------------------------------------------------------------------------
    async def stop(self, timeout: float) -> ExitInfo:
        cid = self.container_id or self.container_name
        errors = docker.errors

        def stop(client: Any) -> str:
            try:
                client.api.stop(cid, timeout=math.ceil(timeout))
                state = client.api.inspect_container(cid)["State"]
                if state.get("Running"):  # never report stopped without seeing it
                    client.api.kill(cid)
                    state = client.api.inspect_container(cid)["State"]
                    if state.get("Running"):
                        raise DriverError(f"container {cid} is still running after a kill")
                return str(state.get("Status"))
            except errors.NotFound:
                return "gone"

        await self.engine.call(stop)
        if self._exit is None:
            return ExitInfo(None, detail="was not running")
        with contextlib.suppress(TimeoutError):
            return await within(asyncio.shield(self._exit), 5)
        return ExitInfo(None, detail="stopped")

    # -- adoption -----------------------------------------------------------------------------
    async def adopt(self, record: dict[str, Any]) -> bool:
        cid = record.get("id")
        if not isinstance(cid, str):
            return False
        errors = docker.errors

        def inspect(client: Any) -> dict[str, Any] | None:
            try:
                info: dict[str, Any] = client.api.inspect_container(cid)
                return info
            except errors.NotFound:
                return None

        info = await self.engine.call(inspect)
        if info is None or not info["State"].get("Running"):
            return False
        if info.get("Name", "").lstrip("/") != self.container_name:
            return False  # the id now names another container: not ours
        self.container_id = cid
        self._exit = await self.engine.watch(cid)
        return True
