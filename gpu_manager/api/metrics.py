"""`GET /metrics`: Prometheus text, read from the daemon's state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpu_manager.daemon import Daemon
from gpu_manager.units import Event, ServiceState

TRANSITION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        snap = d.poller.latest
        g = {k: GaugeMetricFamily(f"gpu_manager_vram_{k}_mb", f"GPU memory {k} (MB)",
                                  labels=["device"]) for k in ("total", "used", "free")}
        for dev in snap.devices:
            for key, value in (("total", dev.total_mb), ("used", dev.used_mb),
                               ("free", dev.free_mb)):
                if value is not None:
                    g[key].add_metric([str(dev.index)], value)
        yield from g.values()
        yield GaugeMetricFamily("gpu_manager_probe_degraded", "1 when running on declared "
                                "budgets without NVML", value=int(snap.source == "declared"))
        yield CounterMetricFamily("gpu_manager_probe_errors", "Failed probe polls",
                                  value=d.poller.errors)
        state = GaugeMetricFamily("gpu_manager_service_state", "1 for the state a service is in",
                                  labels=["service", "state"])
        measured = GaugeMetricFamily("gpu_manager_service_vram_measured_mb",
                                     "VRAM attributed to a service by the probe",
                                     labels=["service"])
        health = CounterMetricFamily("gpu_manager_health_check_failures",
                                     "Failed health checks of running services",
                                     labels=["service"])
        restarts = CounterMetricFamily("gpu_manager_restarts", "Automatic restarts",
                                       labels=["service"])
        sleeps = CounterMetricFamily("gpu_manager_sleeps", "Sleeps the service answered",
                                     labels=["service"])
        wakes = CounterMetricFamily("gpu_manager_wakes", "Wakes that ended healthy",
                                    labels=["service"])
        prewarmed = GaugeMetricFamily("gpu_manager_prewarmed", "1 while a service runs "
                                      "because prewarm started it", labels=["service"])
        for name, unit in d.units.items():
            for s in ServiceState:
                state.add_metric([name, s.value], int(unit.state == s))
            mb = d.orchestrator.measured(name)
            if mb is not None:
                measured.add_metric([name], mb)
            health.add_metric([name], unit.health_failures)
            restarts.add_metric([name], unit.restarts.count)
            sleeps.add_metric([name], unit.sleeps)
            wakes.add_metric([name], unit.wakes)
            prewarmed.add_metric([name], int(name in d.orchestrator.followups.live()))
        yield from (state, measured, health, restarts, sleeps, wakes, prewarmed)
        pre = CounterMetricFamily("gpu_manager_preemptions", "Services stopped or put to "
                                  "sleep to make room for a higher priority",
                                  labels=["service"])
        for name in d.units:
            pre.add_metric([name], d.orchestrator.preemptions.get(name, 0))
        yield pre
        info = d.lock_info
        held = GaugeMetricFamily("gpu_manager_lock_held", "1 while someone holds the GPU lock",
                                 labels=["holder", "backend"])
        held.add_metric([info.holder or "", info.backend], int(info.holder is not None))
        yield held
        if info.ttl_ms is not None:
            yield GaugeMetricFamily("gpu_manager_lock_ttl_seconds", "TTL left on the GPU lock",
                                    value=info.ttl_ms / 1000)


def make_registry(daemon: Daemon) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
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
