"""Docker services through the Docker SDK; every SDK call runs off the event loop.

One `DockerEngine` per daemon owns the client and a single `die` event stream, so a container
that dies is noticed as soon as dockerd says so (no polling). A driver stops only a
container id it created, started or adopted (never one found by name and refused, such as an
operator's container pinned to another card), and reports "stopped" only after inspecting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import docker.errors
import docker.types
import requests
from loguru import logger

from gpu_manager.aio import within
from gpu_manager.config import DockerService
from gpu_manager.units.drivers.base import DriverError, ExitInfo, ExitWatch
from gpu_manager.units.drivers.cards import check_cards

LABEL = "gpu-manager.service"


# An SDK call gets the engine timeout (per HTTP request) plus this before we stop waiting.
CALL_MARGIN_S = 5.0
BACKOFF_MAX_S = 10.0


def _since(ns: int) -> str:
    """A nanosecond timestamp as the Docker API's `since` ("seconds.nanoseconds")."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


class DockerEngine:
    def __init__(self, base_url: str | None = None, timeout: float = 60) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()
        # Our own threads: an engine that accepts connections but never answers holds each
        # call's thread for up to `timeout`; they must not starve the loop's default
        # executor, which native stops, reloads and the state writer need.
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="docker")
        # container id -> (when the watch began, in ns, its future)
        self._watchers: dict[str, list[tuple[int, asyncio.Future[ExitInfo]]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stream: Any = None
        self._closed = False
        # Where the event stream resumes after a break: just past the last event seen, else
        # the `since` it was opened with. Events in the gap are replayed by dockerd.
        self._since_ns: int | None = None
        self.connected = False  # the event stream is open (tests wait on it)
        self.reconnects = 0
        # Cleared only by tests: holds the pump between a break and its reconnect, so the
        # gap in which a death must still be noticed is long enough to act in.
        self.resume = threading.Event()
        self.resume.set()

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

    async def call(self, fn: Any, *args: Any, about: str | None = None,
                   deadline_s: float | None = None, **kwargs: Any) -> Any:
        """Run a blocking SDK call in a thread, within `deadline_s` (default: the engine
        timeout plus a margin). Every engine failure becomes a DriverError naming `about`
        (a container) and saying what the engine said."""
        def run() -> Any:
            client = self._connect()
            return fn(client, *args, **kwargs)

        limit = deadline_s if deadline_s is not None else self.timeout + CALL_MARGIN_S
        on = f" on {about!r}" if about else ""
        try:
            # The thread cannot be cancelled: at the deadline we stop waiting and it finishes
            # (or times out in requests) on its own; its result is dropped.
            async with asyncio.timeout(limit):
                return await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except DriverError:
            raise
        except TimeoutError as exc:
            raise DriverError(f"Docker engine did not answer within {limit:g}s{on}") from exc
        except requests.exceptions.ConnectionError as exc:
            raise DriverError(f"Docker engine unreachable{on}: {exc}") from exc
        except requests.exceptions.Timeout as exc:  # ReadTimeout: one request's own limit
            raise DriverError(f"Docker engine timed out{on}: {exc}") from exc
        except docker.errors.APIError as exc:
            raise DriverError(f"Docker engine error{on}: {exc.explanation or exc}") from exc
        except docker.errors.DockerException as exc:
            raise DriverError(f"Docker error{on}: {exc}") from exc

    # -- die events ---------------------------------------------------------------------------
    async def watch(self, container_id: str) -> asyncio.Future[ExitInfo]:
        """A future resolved when `container_id` dies (checked against its state at once)."""
        self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[ExitInfo] = self._loop.create_future()
        self._watchers.setdefault(container_id, []).append((time.time_ns(), fut))
        if self._thread is None or not self._thread.is_alive():
            await self.call(lambda c: None, about=container_id)  # connected, within a bound
            self._thread = threading.Thread(target=self._pump, name="docker-events", daemon=True)
            self._thread.start()
        # It may have died before the stream saw it.
        state = await self.call(lambda c: c.api.inspect_container(container_id)["State"],
                                about=container_id)
        if not state.get("Running"):
            self._resolve(container_id, ExitInfo(int(state.get("ExitCode", 0)),
                                                 detail="not running"))
        return fut

    def _resolve(self, container_id: str, info: ExitInfo, at_ns: int | None = None) -> None:
        """Resolve the watches of `container_id`; with `at_ns` (an event's time) only those
        that began before it: a replayed death from before a restart is not this run's."""
        kept = []
        for began, fut in self._watchers.pop(container_id, []):
            if at_ns is not None and began > at_ns:
                kept.append((began, fut))
            elif not fut.done():
                fut.set_result(info)
        if kept:
            self._watchers.setdefault(container_id, []).extend(kept)

    def _pump(self) -> None:
        backoff = 0.5
        while not self._closed:
            try:
                client = self._connect()
                if self._since_ns is None:
                    self._since_ns = time.time_ns() - 1_000_000_000
                self._stream = client.events(
                    decode=True, filters={"type": "container", "event": ["die"]},
                    since=_since(self._since_ns))
                self.connected = True
                if self.reconnects:
                    self._recheck(client)  # belt and braces: dockerd keeps few old events
                backoff = 0.5
                for ev in self._stream:
                    self._on_event(ev)
                reason = "it ended"
            except Exception as exc:
                reason = str(exc)
            self.connected = False
            if self._closed:
                return
            logger.warning(f"Docker event stream broke ({reason}); reconnecting in {backoff:g}s")
            time.sleep(backoff)  # a plain thread, off the event loop
            self.resume.wait()
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            self.reconnects += 1
            with self._lock:
                old, self._client = self._client, None
            if old is not None:
                with contextlib.suppress(Exception):
                    old.close()

    def _on_event(self, ev: dict[str, Any]) -> None:
        at_ns = int(ev.get("timeNano") or int(ev.get("time", 0)) * 1_000_000_000)
        if at_ns:
            # dockerd's `since` is inclusive: resume one ns later, or this event comes again.
            self._since_ns = at_ns + 1
        cid = ev.get("id") or ev.get("Actor", {}).get("ID")
        code = ev.get("Actor", {}).get("Attributes", {}).get("exitCode")
        info = ExitInfo(int(code) if code is not None else None, detail="container died")
        if self._loop is not None and cid in self._watchers:
            self._loop.call_soon_threadsafe(self._resolve, cid, info, at_ns or None)

    def _recheck(self, client: Any) -> None:
        """After a reconnect: inspect every watched container; one that is no longer running
        died in the gap (the replay from `since` should say so too; this does not depend on
        how many events dockerd kept)."""
        for cid in list(self._watchers):
            checked = time.time_ns()  # a watch begun after this inspect is not judged by it
            try:
                state = client.api.inspect_container(cid)["State"]
            except docker.errors.NotFound:
                state = {"Running": False, "ExitCode": None}
            if state.get("Running") or self._loop is None:
                continue
            code = state.get("ExitCode")
            info = ExitInfo(int(code) if code is not None else None,
                            detail="died while the Docker event stream was down")
            self._loop.call_soon_threadsafe(self._resolve, cid, info, checked)

    def close(self) -> None:
        self._closed = True
        self.resume.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
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
        # A container this driver created or started whose launch did not finish (abandoned,
        # failed to start): still ours to stop. Written by the launch's thread.
        self._created_id: str | None = None
        self._exit: asyncio.Future[ExitInfo] | None = None
        self._cancel_launch: threading.Event | None = None

    # -- launch -------------------------------------------------------------------------------
    def _get_or_create(self, client: Any, cancel: threading.Event) -> Any:
        errors = docker.errors
        try:
            found = client.containers.get(self.container_name)
        except errors.NotFound:
            pass
        else:
            check_cards(self.container_name, self.name, self.visible, self.cards,
                        found.attrs.get("HostConfig", {}).get("DeviceRequests") or [])
            return found
        if not self.cfg.image:
            raise DriverError(f"container {self.container_name!r} does not exist and no image is "
                              "configured to create it")
        requests_ = []
        if self.cfg.device_request is not None:
            dr = self.cfg.device_request
            # Placed on cards: exactly those (Docker takes a count or ids, never both).
            ids = list(self.visible) or dr.device_ids or []
            requests_.append(docker.types.DeviceRequest(
                driver=dr.driver, count=0 if ids else dr.count, device_ids=ids,
                capabilities=dr.capabilities))
        kwargs = {"name": self.container_name, "command": self.cfg.command,
                  "environment": self.cfg.env, "labels": {LABEL: self.name},
                  "network_mode": self.cfg.network_mode, "device_requests": requests_ or None,
                  "detach": True}
        try:
            try:
                created = client.containers.create(self.cfg.image, **kwargs)
            except errors.ImageNotFound:
                logger.info(f"{self.name}: pulling {self.cfg.image}")
                client.images.pull(self.cfg.image)
                if cancel.is_set():  # the pull outlived the start: create nothing
                    raise DriverError(f"start of {self.container_name!r} abandoned during "
                                      "the image pull") from None
                created = client.containers.create(self.cfg.image, **kwargs)
            self._created_id = str(created.id)
            return created
        except errors.APIError as exc:
            if exc.status_code == 409:
                raise DriverError(f"name conflict: a container named {self.container_name!r} "
                                  f"already exists ({exc.explanation})") from exc
            raise DriverError(f"cannot create {self.container_name!r}: {exc.explanation}"
                              ) from exc

    async def start(self) -> None:
        errors = docker.errors
        # The SDK's thread cannot be cancelled: when our caller gives up (the unit's start
        # deadline, a pull that takes too long), the thread runs on. This flag stops it
        # before it creates or starts anything, so a start we abandoned never leaves a
        # running container that no unit tracks. A stop sets it too.
        cancel = self._cancel_launch = threading.Event()
        self._created_id = None

        def launch(client: Any) -> str:
            container = self._get_or_create(client, cancel)
            if cancel.is_set():
                raise DriverError(f"start of {self.container_name!r} abandoned before it ran")
            if container.status != "running":
                # started by this launch: ours to stop, even if the launch is abandoned
                self._created_id = str(container.id)
                try:
                    container.start()
                except errors.APIError as exc:
                    raise DriverError(f"cannot start container {self.container_name!r}: "
                                      f"{exc.explanation}") from exc
            return str(container.id)

        try:
            # A pull may be part of it: as long as the start may take, plus one engine timeout.
            self.container_id = await self.engine.call(
                launch, about=self.container_name,
                deadline_s=self.cfg.start_timeout_s + self.engine.timeout)
        except BaseException:
            cancel.set()
            raise
        self._exit = await self.engine.watch(self.container_id)

    # -- observe ------------------------------------------------------------------------------
    def record(self) -> dict[str, Any] | None:
        if not self.running() or self.container_id is None:
            return None
        return {"kind": "docker", "id": self.container_id, "container": self.container_name}

    async def pids(self) -> list[int]:
        """The container's processes (host pids); [] when it is not running.

        Raises DriverError when the engine cannot say (unreachable, timed out, an engine
        error): an empty list would read as "nothing holds GPU memory any more", and the
        reclaim wait relies on this evidence; the caller decides how to do without it.
        """
        if self.container_id is None or not self.running():
            return []
        cid = self.container_id
        errors = docker.errors

        def top(client: Any) -> list[int]:
            try:
                out = client.api.top(cid)
            except errors.NotFound:
                return []  # removed: nothing runs
            except errors.APIError as exc:
                if exc.status_code == 409:  # "is not running": it died just now
                    return []
                raise
            col = out["Titles"].index("PID")
            return [int(row[col]) for row in out["Processes"] or []]

        result: list[int] = await self.engine.call(top, about=self.container_name)
        return result

    # -- stop ---------------------------------------------------------------------------------
    async def stop(self, timeout: float) -> ExitInfo:
        # Only an id this driver created, started or adopted: never the name, which may
        # be an operator's own container that a failed launch only looked at.
        cid = self.container_id or self._created_id
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

        if self._cancel_launch is not None:
            self._cancel_launch.set()  # a launch still in its thread must not start it now
        if cid is None:
            return ExitInfo(None, detail="nothing of it was started")
        # docker-py lets the stop request itself run `timeout` past the engine timeout
        status = await self.engine.call(stop, about=self.container_name,
                                        deadline_s=timeout + 2 * self.engine.timeout
                                        + CALL_MARGIN_S)
        if self._exit is None:
            return ExitInfo(None, detail="was not running")
        # Inspect has shown it stopped: the die event may lag behind (a reconnecting stream),
        # so give it a moment for the exit code, then settle from what inspect said.
        with contextlib.suppress(TimeoutError):
            return await within(asyncio.shield(self._exit), 0.5)
        info = ExitInfo(None, detail=f"stopped ({status})")
        if not self._exit.done():
            self._exit.set_result(info)
        return info

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

        info = await self.engine.call(inspect, about=self.container_name)
        if info is None or not info["State"].get("Running"):
            return False
        if info.get("Name", "").lstrip("/") != self.container_name:
            return False  # the id now names another container: not ours
        self.container_id = cid
        self._exit = await self.engine.watch(cid)
        return True
