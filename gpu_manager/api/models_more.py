"""The status' figures of the newer parts: the front door (`serve`), the host RAM sleepers
fill (`host`), and the learned costs of each service (`costs`)."""

from __future__ import annotations

from pydantic import Field

from gpu_manager.api.body import Body


class CostFigure(Body):
    p50_s: float
    n: int


class HostStatus(Body):
    ram_free_mb: int | None = Field(description="Host RAM left for new sleeps (available "
                                    "less the reserve); null: no figure")
    ram_reserve_mb: int
    held_by_sleepers_mb: int = Field(description="Host RAM the sleeping services hold")
    simulated: bool


class IdleStatus(Body):
    after_s: float
    below_util_pct: int
    then: str = Field(description="sleep or stop")
    idle_for_s: float | None = Field(description="How long it has been idle by measure")
    util_pct: int | None = Field(description="Its processes' GPU utilisation (%)")
    util_source: str = Field(description="process (its own pids), device (the card's: the "
                             "driver gives no per-process figure), none (no figure: never "
                             "released)")
    releasing: bool


class ServeStatus(Body):
    url: str
    models: list[str]
    max_concurrent: int
    in_flight: int = Field(description="Requests being forwarded now")
    waiting: int = Field(description="Requests waiting in its queue")
    queue_max: int
    draining: bool = Field(description="A release waits for its requests in flight")
    last_request_at: float | None = Field(description="Wall time of the last request")
    request_starts: int = Field(description="Starts and wakes its requests caused")
    cut: int = Field(description="Requests cut by a release after drain_s")
    idle: IdleStatus | None
