"""A fleet on one machine: Ray nodes on loopback (`ray.cluster_utils.Cluster`, one CPU each,
a small object store) and one real daemon per host on a simulated GPU of its own size.

Ray is asked to stay on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: otherwise it advertises
a non-loopback address and `ray.init` can hang) and not to phone home. Its start is bounded
by a hard deadline: Ray's node start must run on the main thread (it sets signal handlers),
so a stuck start is ended by `faulthandler`, which prints every thread's stack and exits the
run: CI fails instead of hanging. Workers find the `tests` package through PYTHONPATH, set
before the nodes start (the raylets hand their environment to the workers they spawn).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.daemon import ROOT, DaemonProc
from tests.support.env import free_port, unavailable

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
NODE = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024, "include_dashboard": False}
SYSTEM = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2,
          "health_check_initial_delay_ms": 0}
START_S = 90.0  # Ray's start on 2 busy cores: ~5-15 s; past this it is stuck

SERVICE = """
  {name}:
    type: native
    vram_mb: {vram}
    priority: {priority}
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "{name}",
              "--vram-mb", "{vram}", "--port", "{port}", "--startup-s", "0.2"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 1}}
    start_timeout_s: 30
    stop_timeout_s: 10
"""
# Each host declares those of `big`, `small`, `tts` its card can hold; phase 9 runs tts and
# keeps big and small where they fit beside it.
SERVICES = (("big", 12000, 50), ("small", 3000, 20), ("tts", 4000, 60))
PHASES = """phases:
  9:
    name: speak
    services: [tts]
    keep: [{keep}]
"""


def inventory(total_mb: int, address: str, host: str) -> tuple[str, str]:
    # a host declares what its card can hold: the 8 GB host has no `big`
    services = "".join(SERVICE.format(name=n, vram=v, priority=p, port=free_port())
                       for n, v, p in SERVICES if v <= total_mb - 1024)
    return (f"gpu:\n  backend: simulated\n  total_mb: {total_mb}\n  reserve_mb: 1024\n"
            f"services:{services}fleet:\n  address: \"{address}\"\n  host: {host}\n"
            "  membership_ttl_s: 0\n"), PHASES.format(keep=", ".join(
                n for n, v, _ in SERVICES if n != "tts" and v <= total_mb - 1024))


@dataclass
class FleetHosts:
    cluster: Any
    daemons: dict[str, DaemonProc]
    nodes: dict[str, Any]  # host name -> its Ray node (cluster_utils' handle)

    def node_id(self, host: str) -> str:
        return str(self.nodes[host].node_id)

    def remove(self, host: str) -> None:
        self.cluster.remove_node(self.nodes.pop(host), allow_graceful=False)


@contextlib.contextmanager
def fleet_on_loopback(tmp: Path, sizes: dict[str, int]) -> Iterator[FleetHosts]:
    """Hosts `sizes` (name -> card MB), the first one the Ray head; yields with the test
    process connected to Ray as a driver."""
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "PYTHONPATH")}
    os.environ.update(RAY_ENV)  # before Ray's import: it reads them then
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        unavailable("Ray is not installed (the fleet extra: ./dev test installs it)")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved["PYTHONPATH"]) if p)
    daemons = {name: DaemonProc(tmp / name) for name in sizes}
    started: dict[str, Any] = {}
    box: dict[str, Any] = {}

    def start() -> None:
        try:
            names = list(sizes)
            labels = {n: {"fleet-host": n, "gpum-port": str(daemons[n].port)} for n in names}
            cluster = box["cluster"] = Cluster(initialize_head=True, head_node_args={
                **NODE, "labels": labels[names[0]], "_system_config": dict(SYSTEM)})
            started[names[0]] = cluster.head_node
            for n in names[1:]:
                started[n] = cluster.add_node(**NODE, labels=labels[n])
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, logging_level="WARNING")
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    faulthandler.dump_traceback_later(START_S, exit=True)
    try:
        start()
    finally:
        faulthandler.cancel_dump_traceback_later()
    try:
        if "error" in box:
            raise box["error"]
        cluster = box["cluster"]
        for name, d in daemons.items():
            services, phases = inventory(sizes[name], cluster.address, name)
            (d.config_dir / "services.yaml").write_text(services)
            (d.config_dir / "phases.yaml").write_text(phases)
            d.start()
        yield FleetHosts(cluster, daemons, started)
    finally:
        for d in daemons.values():
            d.close()
        with contextlib.suppress(Exception):
            ray.shutdown()
        if "cluster" in box:
            box["cluster"].shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
