"""`GET /metrics`: Prometheus text, read from the daemon's state at scrape time.

Conventions (what `promtool check metrics` and Grafana's unit handling expect): base units
(bytes, seconds, ratios 0-1), counters end in `_total`, figures per GPU carry a `device` label
(the index NVML gives), and labels take values only from small fixed sets: the inventory's
service names, the unit states, the lock's holder kinds. Who holds the lock is a kind, never
the free-text holder string, which would make a new series per operation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpu_manager import __version__
from gpu_manager.api.status import held_for
from gpu_manager.daemon import Daemon
from gpu_manager.orchestrator.cards import foreign_on
from gpu_manager.units import Event, ServiceState

TRANSITION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
# What generate_latest writes: the classic text format, which every Prometheus reads
# (prometheus_client's CONTENT_TYPE_LATEST names a newer version of it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MIB = 1024 * 1024  # the inventory's and the probe's "MB" are MiB
LOCK_KINDS = ("operation", "leases", "daemon", "legacy", "releasing")


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        yield from self._gpu()
        yield from self._services()
        yield from self._lock()

    def _gpu(self) -> Iterator[Metric]:
        d = self.daemon
        snap = d.poller.latest
        gpu = d.inventory.gpu
        info = _gauge("gpu_manager_build_info", "The daemon's version (always 1)", ["version"])
        info.add_metric([__version__], 1)
        yield info
        vram = {k: _gauge(f"gpu_manager_vram_{k}_bytes", doc, ["device"]) for k, doc in (
            ("total", "GPU memory in all"), ("used", "GPU memory in use, by anyone"),
            ("free", "GPU memory free"),
            ("reserve", "GPU memory the inventory keeps free (gpu.reserve_mb)"),
            ("foreign", "GPU memory used by processes the daemon did not start"))}
        temperature = _gauge("gpu_manager_gpu_temperature_celsius", "GPU temperature",
                             ["device"])
        utilization = _gauge("gpu_manager_gpu_utilization_ratio",
                             "GPU busy time over the last sample period (0-1)", ["device"])
        observed = d.orchestrator.observed()
        for dev in snap.devices:
            label = [str(dev.index)]
            for key, value in (("total", dev.total_mb), ("used", dev.used_mb),
                               ("free", dev.free_mb)):
                if value is not None:
                    vram[key].add_metric(label, value * MIB)
            card = gpu.gpu(dev.index)
            if card is not None:  # a device the inventory plans on
                vram["reserve"].add_metric(label, card.reserve_mb * MIB)
                if dev.used_mb is not None:
                    vram["foreign"].add_metric(label, foreign_on(observed, dev.index) * MIB)
            if dev.temperature_c is not None:
                temperature.add_metric(label, dev.temperature_c)
            if dev.utilization_percent is not None:
                utilization.add_metric(label, dev.utilization_percent / 100)
        yield from (*vram.values(), temperature, utilization)
        yield GaugeMetricFamily("gpu_manager_probe_degraded", "1 while running on declared "
                                "budgets without a GPU probe",
                                value=int(snap.source == "declared"))
        yield CounterMetricFamily("gpu_manager_probe_errors", "Failed probe polls",
                                  value=d.poller.errors)
        age = max(0.0, time.monotonic() - snap.taken_at) if snap.taken_at else None
        if age is not None:
            yield GaugeMetricFamily("gpu_manager_probe_age_seconds",
                                    "Time since the last GPU sample", value=age)

    def _services(self) -> Iterator[Metric]:
        d = self.daemon
        orch = d.orchestrator
        state = _gauge("gpu_manager_service_state", "1 for the state a service is in",
                       ["service", "state"])
        measured = _gauge("gpu_manager_service_vram_measured_bytes",
                          "GPU memory the probe attributes to a service", ["service", "device"])
        declared = _gauge("gpu_manager_service_vram_declared_bytes",
                          "GPU memory the inventory declares for a service (vram_mb)",
                          ["service"])
        prewarmed = _gauge("gpu_manager_service_prewarmed",
                           "1 while a service runs because prewarm started it", ["service"])
        counters = {k: CounterMetricFamily(f"gpu_manager_{k}", doc, labels=["service"])
                    for k, doc in (
                        ("health_check_failures", "Failed health checks of running services"),
                        ("restarts", "Automatic restarts"),
                        ("sleeps", "Sleeps the service answered"),
                        ("wakes", "Wakes that ended healthy"),
                        ("preemptions", "Times a service was stopped or put to sleep to make "
                                        "room for a higher priority"))}
        live = orch.followups.live()
        for name, unit in list(d.units.items()):
            for s in ServiceState:
                state.add_metric([name, s.value], int(unit.state == s))
            for card in orch.cards_of(name):  # where it runs: one series per card
                mb = orch.measured(name, device=card)
                if mb is not None:
                    measured.add_metric([name, str(card)], mb * MIB)
            declared.add_metric([name], unit.cfg.vram_mb * MIB)
            prewarmed.add_metric([name], int(name in live))
            for key, value in (("health_check_failures", unit.health_failures),
                               ("restarts", unit.restarts.count), ("sleeps", unit.sleeps),
                               ("wakes", unit.wakes),
                               ("preemptions", orch.preemptions.get(name, 0))):
                counters[key].add_metric([name], value)
        cost = _gauge("gpu_manager_service_cost_seconds", "Learned: the median of a "
                      "service's last measured starts, wakes, sleeps, stops and reclaim waits",
                      ["service", "kind"])
        for name, kinds in orch.costs.as_dict().items():
            for kind, figure in kinds.items():
                cost.add_metric([name, kind], figure["p50_s"])
        yield from (state, measured, declared, prewarmed, cost, *counters.values())
        yield GaugeMetricFamily("gpu_manager_leases", "Client leases holding GPU memory",
                                value=len(d.leases.active))
        yield GaugeMetricFamily("gpu_manager_operations_in_flight",
                                "Operations queued or running", value=len(orch.ops.in_flight()))

    def _lock(self) -> Iterator[Metric]:
        d = self.daemon
        info = d.lock_info
        kind = held_for(d)["kind"]
        yield GaugeMetricFamily("gpu_manager_lock_up", "1 while the lock backend answers",
                                value=int(info.ok))
        held = _gauge("gpu_manager_lock_held", "1 while the GPU lock is held, by the kind of "
                      "holder (operation, leases, daemon, legacy, releasing)", ["kind"])
        for k in LOCK_KINDS:
            held.add_metric([k], int(kind == k))
        yield held
        since = d.lock_held_since
        yield GaugeMetricFamily("gpu_manager_lock_held_seconds", "How long the current holder "
                                "has held the GPU lock (0 when free)",
                                value=0.0 if since is None else time.monotonic() - since)
        if info.ttl_ms is not None:
            yield GaugeMetricFamily("gpu_manager_lock_ttl_seconds", "TTL left on the GPU lock",
                                    value=info.ttl_ms / 1000)
        keeper = d.orchestrator.keeper
        losses = CounterMetricFamily(
            "gpu_manager_lock_losses", "Times the daemon lost the GPU lock it held: taken "
            "back at once (retaken), or gone to someone else with every lease and operation "
            "that relied on it (revoked)", labels=["outcome"])
        losses.add_metric(["retaken"], keeper.retakes)
        losses.add_metric(["revoked"], keeper.revocations)
        yield losses
        yield GaugeMetricFamily("gpu_manager_lock_in_doubt", "1 while the daemon cannot tell "
                                "whether it still holds the GPU lock (backend unreachable "
                                "after a loss): no start goes ahead", value=int(
                                    keeper.doubt is not None))


def make_registry(daemon: Daemon) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    # the daemon's own CPU, memory and file descriptors (process_*), for its dashboard row
    ProcessCollector(registry=registry)
    transitions = Histogram("gpu_manager_transition_duration_seconds",
                            "Wall time of each transition", ["kind", "outcome"],
                            buckets=TRANSITION_BUCKETS, registry=registry)

    def observe(event: Event) -> None:
        data = event.data
        if event.kind == "operation" and data.get("duration_s") is not None:
            transitions.labels(data["request"]["kind"], data["status"]).observe(
                data["duration_s"])

    daemon.bus.on(observe)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
