"""Which hosts the fleet has: Ray's node list, read from its GCS, bounded.

The daemon does not `ray.init()`: a driver connection is a process-wide Ray worker that Ray
ends (with the process) when the head stays unreachable, and a coordinator must outlive its
cluster's restarts. A GCS client asks the node table and answers an error in time instead.
Ray is imported only here, and only when a fleet is configured: the single-host daemon's
start stays as it was.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from loguru import logger

from gpu_manager.config.fleet import HOST_LABEL, PORT_LABEL

# The static resource `gpu-manager fleet join` gives a host's node: its GPUs' MB in all.
VRAM_RESOURCE = "gpum_vram_mb"


@dataclass(frozen=True, slots=True)
class Host:
    """One host of the fleet as Ray knows it."""

    name: str
    url: str  # its daemon: the node's address plus its `gpum-port` label
    node_id: str  # hex; what NodeAffinitySchedulingStrategy pins to
    alive: bool  # Ray's word: its raylet passes health checks
    vram_mb: int | None = None  # the static resource it joined with, if any
    labels: Mapping[str, str] = field(default_factory=dict)


class MembershipError(Exception):
    """The node list could not be read (Ray unreachable, not installed)."""


class Membership(Protocol):
    async def hosts(self) -> list[Host]: ...

    async def aclose(self) -> None: ...


_TOLD: set[tuple[str, str]] = set()  # pairs of nodes claiming one host, already logged
# Ray's node table, a row per node: (node id, alive, address, labels, resources)
Row = tuple[str, bool, str, Mapping[str, str], Mapping[str, float]]


def hosts_of(nodes: list[Row]) -> list[Host]:
    """Hosts from (node id, alive, address, labels, resources) rows: only nodes labelled
    as a fleet host; a host name on several nodes (a node restarted: its old entry stays
    in Ray's table as dead) is its live node, else its last."""
    by_name: dict[str, Host] = {}
    for node_id, alive, address, labels, resources in nodes:
        name, port = labels.get(HOST_LABEL), labels.get(PORT_LABEL)
        if not name or not port or not port.isdigit() or not 0 < int(port) < 65536:
            continue  # not a fleet host (or a label no daemon could listen on)
        vram = resources.get(VRAM_RESOURCE)
        host = Host(name, f"http://{_netloc(address)}:{int(port)}", node_id, alive,
                    int(vram) if vram else None, dict(labels))
        old = by_name.get(name)
        if old is not None and old.alive and alive:
            if (old.node_id, node_id) not in _TOLD:  # once, not at every read of the table
                _TOLD.add((old.node_id, node_id))
                logger.warning(f"fleet: two live Ray nodes are labelled {HOST_LABEL}={name} "
                               f"({old.node_id}, {node_id}): the first is used")
            continue
        if old is None or alive or not old.alive:
            by_name[name] = host
    return sorted(by_name.values(), key=lambda h: h.name)


def _netloc(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class StaticMembership:
    """A fixed list (benchmarks, tests of placement without Ray)."""

    def __init__(self, hosts: list[Host]) -> None:
        self._hosts = list(hosts)

    async def hosts(self) -> list[Host]:
        return list(self._hosts)

    def set(self, hosts: list[Host]) -> None:
        self._hosts = list(hosts)

    async def aclose(self) -> None:
        return None


class RayMembership:
    """Ray's node table through a GCS client, answers (and failures) reused for `ttl_s`.

    The reads run on one thread of their own, one at a time: a GCS client that hangs (its
    constructor waits ~40 s for an unreachable head, whatever its timeout) holds that thread
    only, never the daemon's shared executor. Callers share the read in flight, each within
    its own deadline; a read that outlives a caller goes on and serves the next."""

    def __init__(self, address: str, timeout_s: float, ttl_s: float) -> None:
        self.address = address.removeprefix("ray://")
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._client: Any = None
        self._cached: tuple[float, list[Host] | MembershipError] | None = None
        self._reading: asyncio.Future[list[Row]] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fleet-gcs")

    async def hosts(self) -> list[Host]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < max(self.ttl_s, 0.0):
            return _answer(self._cached[1])
        if self._reading is None or self._reading.done():
            self._reading = asyncio.get_running_loop().run_in_executor(self._pool, self._read)
            self._reading.add_done_callback(self._keep)
        try:
            async with asyncio.timeout(self.timeout_s + 1):
                rows = await asyncio.shield(self._reading)
        except TimeoutError:
            raise MembershipError(f"Ray at {self.address} did not answer within "
                                  f"{self.timeout_s + 1:g}s") from None
        return hosts_of(rows)

    def _keep(self, fut: asyncio.Future[list[Row]]) -> None:
        """A read's outcome, kept for `ttl_s` (a failure too: Ray down is asked again at
        most that often, not once per caller)."""
        if fut.cancelled():
            return
        exc = fut.exception()
        outcome: list[Host] | MembershipError = (
            hosts_of(fut.result()) if exc is None else exc if isinstance(exc, MembershipError)
            else MembershipError(f"Ray at {self.address}: {exc}"))
        self._cached = (time.monotonic(), outcome)

    def _read(self) -> list[Row]:
        try:  # the fleet extra, on demand; Ray's GCS client is not in its typed surface
            gcs_client: Any = importlib.import_module("ray._raylet").GcsClient
            alive_state = importlib.import_module("ray.core.generated.gcs_pb2").GcsNodeInfo.ALIVE
        except ImportError as exc:
            raise MembershipError("Ray is not installed: install the fleet extra "
                                  "(pip install 'gpu-manager[fleet]')") from exc
        try:
            if self._client is None:
                self._client = gcs_client(address=self.address)
            info = self._client.get_all_node_info(timeout=self.timeout_s)
        except Exception as exc:  # Ray's RpcError and friends: the node list is unknown
            raise MembershipError(f"Ray at {self.address}: {exc}") from exc
        return [(node_id.hex(), node.state == alive_state, node.node_manager_address,
                 dict(node.labels), dict(node.resources_total))
                for node_id, node in info.items()]

    async def aclose(self) -> None:
        self._client = None
        # a read stuck in Ray's client is left to its thread (not joined: shutdown goes on)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _answer(outcome: list[Host] | MembershipError) -> list[Host]:
    if isinstance(outcome, MembershipError):
        raise outcome
    return list(outcome)
