"""What the front door counts, for `/metrics` (Prometheus, seconds) and the status."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
START_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class DoorStats:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.requests = Counter(
            "gpu_manager_frontdoor_requests", "Requests through the front door, by service and "
            "answer class (2xx, 4xx, 5xx; `cut`: ended by a release after drain_s, "
            "`gone`: the client went away)", ["service", "code"], registry=r)
        self.duration = Histogram(
            "gpu_manager_frontdoor_request_duration_seconds", "From admission to the last "
            "byte relayed", ["service"], buckets=REQUEST_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "gpu_manager_frontdoor_queue_wait_seconds", "How long a request waited for its "
            "service (a start, a wake, a free slot) before it was forwarded", ["service"],
            buckets=START_BUCKETS, registry=r)
        self.cold = Histogram(
            "gpu_manager_frontdoor_cold_start_seconds", "The wait of requests that found "
            "their service stopped or asleep, until they were forwarded to it", ["service"],
            buckets=START_BUCKETS, registry=r)
        self.starts = Counter(
            "gpu_manager_frontdoor_starts", "Starts and wakes caused by requests",
            ["service"], registry=r)
        self.cuts = Counter(
            "gpu_manager_frontdoor_drained_requests", "Requests in flight when a release "
            "came: finished within drain_s, or cut", ["service", "outcome"], registry=r)
        self.idle = Counter(
            "gpu_manager_frontdoor_idle_releases", "Services released because they were "
            "idle by measure", ["service", "outcome"], registry=r)

    def queued(self, name: str, waited: float, cold: bool) -> None:
        self.queue_wait.labels(name).observe(waited)
        if cold:
            self.cold.labels(name).observe(waited)

    def started(self, name: str) -> None:
        self.starts.labels(name).inc()

    def drained(self, name: str, finished: int, cut: int) -> None:
        if finished:
            self.cuts.labels(name, "finished").inc(finished)
        if cut:
            self.cuts.labels(name, "cut").inc(cut)

    def answered(self, name: str, code: str, seconds: float | None) -> None:
        self.requests.labels(name, code).inc()
        if seconds is not None:
            self.duration.labels(name).observe(seconds)


class GateCollector(Collector):
    """In flight and waiting, read from the gates at scrape time."""

    def __init__(self, gates: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.gates = gates

    def collect(self) -> Iterator[Metric]:
        flight = GaugeMetricFamily("gpu_manager_frontdoor_in_flight",
                                   "Requests being forwarded now", labels=["service"])
        waiting = GaugeMetricFamily("gpu_manager_frontdoor_waiting",
                                    "Requests waiting in the service's queue",
                                    labels=["service"])
        for name, (n, w) in sorted(self.gates().items()):
            flight.add_metric([name], n)
            waiting.add_metric([name], w)
        yield flight
        yield waiting
