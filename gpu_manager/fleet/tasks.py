"""Ray tasks and actors that need GPU memory: `remote(vram_mb=...)`.

    from gpu_manager.fleet import remote

    @remote(vram_mb=8000)
    def embed(batch): ...          # a Ray task: embed.remote(batch) -> ObjectRef

    @remote(vram_mb=12000)
    class Trainer: ...             # an actor: Trainer.remote(...) -> ActorHandle

A call is placed by the fleet (`POST /fleet/acquire?dry_run=true`: the host whose daemon can
give the VRAM), pinned there (`NodeAffinitySchedulingStrategy(soft=False)`), and takes a lease
on that host's daemon before the user's code runs: pid, Ray task or actor id in its metadata,
renewed every third of its TTL. A task releases it in `finally`; an actor holds it for its
life. A task or actor killed with its node leaves nothing: its daemon sees the pid gone and
takes the lease back (and its TTL ends it in any case).

If the chosen host refuses the lease (its dry run was stale) or its node dies, the call is
placed again without that host, at most `attempts` places. A task's placing runs in a small
Ray task of its own (no CPU) pinned near the caller, so `.remote()` returns at once with an
ObjectRef like any task's; `ray.get` on it gives the user function's result.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import ray
from loguru import logger
from ray import exceptions as rex
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from gpu_manager.config.fleet import HOST_LABEL, PORT_LABEL

URL_ENV = "GPU_MANAGER_FLEET_URL"
# .options() the fleet sets itself
RESERVED = frozenset({"scheduling_strategy", "max_retries", "max_restarts", "retry_exceptions",
                      "max_task_retries"})
TOKEN_ENV = "GPU_MANAGER_TOKEN"
# What a lost node, a dead worker or a hard pin to a dead node raises: placed again elsewhere.
GONE = (rex.NodeDiedError, rex.WorkerCrashedError, rex.TaskUnschedulableError,
        rex.ActorDiedError, rex.ActorUnschedulableError, rex.LocalRayletDiedError)


class PlacementRefused(Exception):
    """The chosen host's daemon did not grant the lease (its dry run was stale)."""

    def __init__(self, host: str, why: str) -> None:
        super().__init__(f"{host} refused the lease: {why}")
        self.host, self.why = host, why

    def __reduce__(self) -> tuple[Any, ...]:
        return (PlacementRefused, (self.host, self.why))


class FleetPlacementError(Exception):
    """No host of the fleet could run it: every host's answer, every place tried."""

    def __init__(self, message: str, hosts: list[Any], attempts: list[Any]) -> None:
        super().__init__(message)
        self.hosts, self.attempts = hosts, attempts

    def __reduce__(self) -> tuple[Any, ...]:
        return (FleetPlacementError, (str(self), self.hosts, self.attempts))


@dataclass(frozen=True)
class Options:
    vram_mb: int
    fleet_url: str | None  # None: found through Ray's node labels at each placement
    token: str | None = field(repr=False)
    priority: int = 1
    ttl_s: float = 30.0
    attempts: int = 3
    acquire_timeout_s: float = 30.0
    http_timeout_s: float = 10.0
    ray_options: dict[str, Any] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def fleet_urls(explicit: str | None) -> list[str]:
    """Where to ask the fleet: `explicit`, else $GPU_MANAGER_FLEET_URL, else every live Ray
    node labelled as a fleet host (any fleet daemon answers for all), asked at each
    placement: the host asked first may be the one that went away."""
    url = explicit or os.environ.get(URL_ENV)
    if url:
        return [url.rstrip("/")]
    # (Ray's own function is untyped: named through a typed alias, no ignore is needed
    # whether mypy sees Ray installed or not)
    read_nodes: Callable[[], list[dict[str, Any]]] = ray.nodes
    nodes = read_nodes()
    urls = []
    for node in nodes:
        labels = node.get("Labels") or {}
        port = str(labels.get(PORT_LABEL) or "")
        if node.get("Alive") and labels.get(HOST_LABEL) and port.isdigit():
            address = str(node["NodeManagerAddress"])
            urls.append(f"http://{f'[{address}]' if ':' in address else address}:{port}")
    if not urls:
        raise FleetPlacementError("no live Ray node is labelled as a fleet host "
                                  f"({HOST_LABEL}, {PORT_LABEL}): run `gpu-manager fleet "
                                  "join`", [], [])
    return urls


def place(opts: Options, exclude: set[str], requester: str) -> dict[str, Any]:
    """The host the fleet chooses now (a dry run: nothing is held yet), asked of the first
    fleet daemon that answers."""
    body = {"session_id": f"place-{os.getpid()}-{time.monotonic_ns()}", "requester": requester,
            "priority": opts.priority, "vram_mb": opts.vram_mb, "exclude": sorted(exclude)}
    why = "no fleet daemon to ask"
    for url in fleet_urls(opts.fleet_url):
        try:
            resp = httpx.post(f"{url}/fleet/acquire", params={"dry_run": "true"}, json=body,
                              headers=opts.headers(), timeout=opts.http_timeout_s,
                              trust_env=False)
            answer = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            why = f"the fleet at {url} did not answer: {exc}"
            continue
        if not isinstance(answer, dict):
            why = f"the fleet at {url} answered HTTP {resp.status_code} without a JSON object"
            continue
        if resp.status_code != 200:
            raise FleetPlacementError(str(answer.get("detail") or answer),
                                      answer.get("hosts", []), answer.get("attempts", []))
        return answer
    raise FleetPlacementError(why, [], [])


def terms(placed: dict[str, Any], last: bool) -> dict[str, Any]:
    """The placement with what its lease asks of the host: to preempt no more than its dry
    run did (a host whose room went meanwhile refuses at once instead), and to wait for
    room only at the last place tried."""
    preempts = placed.get("placement", {}).get("chosen", {}).get("preempts", [])
    limit = max((int(p["priority"]) for p in preempts), default=-1)
    return {**placed, "terms": {"max_preempt": limit, "wait": last}}


class HeldLease:
    """A lease on one host's daemon held by this process: acquired, renewed, released."""

    def __init__(self, opts: Options, host: str, url: str, session_id: str, requester: str,
                 metadata: dict[str, Any], terms: dict[str, Any] | None = None) -> None:
        self.opts, self.host, self.url = opts, host, url.rstrip("/")
        self.terms = terms or {}  # what the placement promised: max_preempt, wait
        self.session_id, self.requester, self.metadata = session_id, requester, metadata
        self.answer: dict[str, Any] = {}
        self.lost: str | None = None  # why the lease went while held (its daemon said so)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.opts.headers(),
                          timeout=timeout, trust_env=False)

    def acquire(self) -> dict[str, Any]:
        body = {"session_id": self.session_id, "requester": self.requester,
                "priority": self.opts.priority, "vram_mb": self.opts.vram_mb,
                "ttl_s": self.opts.ttl_s, "pid": os.getpid(), "metadata": self.metadata,
                "timeout_ms": int(self.opts.acquire_timeout_s * 1000), **self.terms}
        try:
            resp = self._post("/gpu/acquire", body, self.opts.acquire_timeout_s + 5)
            answer: dict[str, Any] = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise PlacementRefused(self.host, f"its daemon did not answer: {exc}") from exc
        if resp.status_code != 200 or not answer.get("success"):
            raise PlacementRefused(self.host, str(answer.get("error") or resp.status_code))
        self.answer = answer
        self._renewer = threading.Thread(target=self._renew, daemon=True,
                                         name=f"gpum-renew-{self.session_id}")
        self._renewer.start()
        return answer

    def _renew(self) -> None:
        while not self._stop.wait(max(self.opts.ttl_s / 3, 0.2)):
            try:
                resp = self._post("/gpu/renew", {"session_id": self.session_id},
                                  self.opts.http_timeout_s)
                if resp.status_code in (404, 409):  # gone or lost: nothing left to renew
                    self.lost = str(resp.json().get("error") or resp.status_code)
                    logger.error(f"GPU lease {self.session_id} on {self.host} was lost while "
                                 f"held ({self.lost}): this process no longer holds its VRAM")
                    return
            except (httpx.HTTPError, ValueError):
                continue  # its TTL is the bound; try again at the next beat

    def release(self) -> None:
        self._stop.set()
        # on failure its daemon takes it back when this process exits, or at its TTL
        with contextlib.suppress(httpx.HTTPError):
            self._post("/gpu/release", {"session_id": self.session_id},
                       self.opts.http_timeout_s)


def _ids() -> dict[str, Any]:
    ctx = ray.get_runtime_context()
    return {"ray_job_id": ctx.get_job_id(), "ray_node_id": ctx.get_node_id(),
            "ray_task_id": ctx.get_task_id(), "ray_actor_id": ctx.get_actor_id()}


def _leased_call(fn: Callable[..., Any], opts: Options, placed: dict[str, Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    ids = _ids()
    lease = HeldLease(opts, placed["host"], placed["url"], f"ray-task-{ids['ray_task_id']}",
                      f"ray:{getattr(fn, '__name__', 'task')}", ids, placed["terms"])
    answer = lease.acquire()
    visible = answer.get("cuda_visible_devices")
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:  # several GPUs: the card granted
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        return fn(*args, **kwargs)
    finally:
        lease.release()
        if visible:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            if before is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = before


_leased_remote = ray.remote(_leased_call)


def _place_and_run(fn: Callable[..., Any], opts: Options, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
    excluded: set[str] = set()
    tried: list[dict[str, Any]] = []
    name = f"ray:{getattr(fn, '__name__', 'task')}"
    for n in range(1, opts.attempts + 1):
        placed = terms(place(opts, excluded, name), n == opts.attempts)
        ref = _leased_remote.options(
            max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                placed["node_id"], soft=False), **opts.ray_options).remote(
            fn, opts, placed, args, kwargs)
        try:
            return ray.get(ref)
        except PlacementRefused as exc:  # stale: that host's room went meanwhile
            why = exc.why
        except GONE as exc:  # its node (or worker) died under it
            if isinstance(exc, rex.RayTaskError):
                raise  # the user's own code met a dead worker of its own: its error
            why = f"{type(exc).__name__}: {exc}".splitlines()[0]
        tried.append({"host": placed["host"], "error": why})
        excluded.add(placed["host"])
    raise FleetPlacementError(f"{name}: {len(tried)} places tried, none finished it", [], tried)


_placer = ray.remote(num_cpus=0, max_retries=0)(_place_and_run)


class FleetFunction:
    def __init__(self, fn: Callable[..., Any], opts: Options) -> None:
        self._fn, self._opts = fn, opts

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """An ObjectRef of the function's result, run where the VRAM is."""
        here = ray.get_runtime_context().get_node_id()
        return _placer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            here, soft=True)).remote(self._fn, self._opts, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a fleet task is called with .remote(...)")


def _leased_class(cls: type) -> type:
    class Leased(cls):  # type: ignore[misc]
        def __init__(self, _gpum: tuple[Options, dict[str, Any]], *args: Any,
                     **kwargs: Any) -> None:
            opts, placed = _gpum
            ids = _ids()
            self._gpum_lease = HeldLease(opts, placed["host"], placed["url"],
                                         f"ray-actor-{ids['ray_actor_id']}",
                                         f"ray:{cls.__name__}", ids, placed["terms"])
            visible = self._gpum_lease.acquire().get("cuda_visible_devices")
            if visible:  # several GPUs: the card granted, before the user's code loads
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
            try:
                super().__init__(*args, **kwargs)
            except BaseException:
                self._gpum_lease.release()
                raise

        def gpu_lease(self) -> dict[str, Any]:
            """The lease this actor holds (its host's answer)."""
            return self._gpum_lease.answer

        def release_gpu(self) -> None:
            self._gpum_lease.release()

    Leased.__name__, Leased.__qualname__ = cls.__name__, cls.__qualname__
    return Leased


class FleetActorClass:
    def __init__(self, cls: type, opts: Options, ready_timeout_s: float) -> None:
        self._remote: Any = ray.remote(_leased_class(cls))
        self._name, self._opts, self._ready_timeout_s = cls.__name__, opts, ready_timeout_s

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """An actor handle on the host that had the VRAM, its lease held."""
        excluded: set[str] = set()
        tried: list[dict[str, Any]] = []
        for n in range(1, self._opts.attempts + 1):
            placed = terms(place(self._opts, excluded, f"ray:{self._name}"),
                           n == self._opts.attempts)
            handle = self._remote.options(
                max_restarts=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                    placed["node_id"], soft=False), **self._opts.ray_options).remote(
                (self._opts, placed), *args, **kwargs)
            try:
                ray.get(handle.__ray_ready__.remote(), timeout=self._ready_timeout_s)
                return handle
            except (PlacementRefused, *GONE, rex.GetTimeoutError) as exc:
                tried.append({"host": placed["host"],
                              "error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
                excluded.add(placed["host"])
                ray.kill(handle)
            except BaseException:
                ray.kill(handle)  # nothing half-made is left holding a lease
                raise
        raise FleetPlacementError(f"ray:{self._name}: {len(tried)} places tried, none took "
                                  "it", [], tried)


def remote(vram_mb: int, *, fleet: str | None = None, token: str | None = None,
           priority: int = 1, ttl_s: float = 30.0, attempts: int = 3,
           acquire_timeout_s: float = 30.0, ready_timeout_s: float = 120.0,
           **ray_options: Any) -> Callable[[Any], Any]:
    """Place a Ray task or actor where a daemon can give it `vram_mb` (see the module).
    `fleet`: a fleet daemon's URL (default: $GPU_MANAGER_FLEET_URL, else found through
    Ray's node labels); `token`: the daemons' token (default: $GPU_MANAGER_TOKEN);
    `ray_options`: passed to `.options()` (num_cpus, resources, ...)."""
    if vram_mb < 0 or attempts < 1:
        raise ValueError("vram_mb must be >= 0 and attempts >= 1")
    taken = sorted(set(ray_options) & RESERVED)
    if taken:
        raise ValueError(f"{', '.join(taken)}: set by the fleet (pinning to the chosen host, "
                         "placing again instead of Ray's retries)")

    def wrap(obj: Any) -> Any:
        opts = Options(vram_mb, fleet, token or os.environ.get(TOKEN_ENV),
                       priority, ttl_s, attempts, acquire_timeout_s,
                       ray_options=dict(ray_options))
        if isinstance(obj, type):
            return FleetActorClass(obj, opts, ready_timeout_s)
        return FleetFunction(obj, opts)

    return wrap
