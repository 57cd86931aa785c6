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
from dataclasses import dataclass, field
from typing import Any, Protocol

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


def hosts_of(nodes: list[tuple[str, bool, str, Mapping[str, str], Mapping[str, float]]]
             ) -> list[Host]:
    """Hosts from (node id, alive, address, labels, resources) rows: only nodes labelled
    as a fleet host; a host name on several nodes (a node restarted: its old entry stays
    in Ray's table as dead) is its live node, else its last."""
    by_name: dict[str, Host] = {}
    for node_id, alive, address, labels, resources in nodes:
        name, port = labels.get(HOST_LABEL), labels.get(PORT_LABEL)
        if not name or not port or not port.isdigit():
            continue
        vram = resources.get(VRAM_RESOURCE)
        host = Host(name, f"http://{_netloc(address)}:{int(port)}", node_id, alive,
                    int(vram) if vram else None, dict(labels))
        old = by_name.get(name)
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
    """Ray's node table through a GCS client, each question within `timeout_s`, answers
    reused for `ttl_s` (a placement asks once, not once per host)."""

    def __init__(self, address: str, timeout_s: float, ttl_s: float) -> None:
        self.address = address.removeprefix("ray://")
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._client: Any = None
        self._cached: tuple[float, list[Host]] | None = None
        self._lock = asyncio.Lock()

    async def hosts(self) -> list[Host]:
        async with self._lock:  # one question in flight; the others share its answer
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < self.ttl_s:
                return list(self._cached[1])
            try:
                # the thread is left to finish on its own if it outlives the deadline:
                # the GCS client's own timeout ends it soon after
                async with asyncio.timeout(self.timeout_s + 1):
                    rows = await asyncio.to_thread(self._read)
            except TimeoutError:
                raise MembershipError(f"Ray at {self.address} did not answer within "
                                      f"{self.timeout_s + 1:g}s") from None
            hosts = hosts_of(rows)
            self._cached = (time.monotonic(), hosts)
            return list(hosts)

    def _read(self) -> list[tuple[str, bool, str, Mapping[str, str], Mapping[str, float]]]:
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
