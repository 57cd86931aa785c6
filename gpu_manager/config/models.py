"""The inventory as pydantic models: `services.yaml` and `phases.yaml`.

Every model forbids unknown keys: a typo such as `vram: 4000` must be an error that names the
line, not a silently ignored field that makes the planner believe the service needs 0 MB.
Cross-file rules (phases naming services, budgets against the GPU) live in `Inventory`.
"""

from __future__ import annotations

import shlex
import signal
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from gpu_manager.config.fleet import FleetConfig
from gpu_manager.config.serve import ServeConfig
from gpu_manager.config.sleep import (
    AsleepCheck,
    HttpCall,
    HttpUrl,
    OllamaEvict,
    PauseConfig,
    SleepApi,
    SleepConfig,
    _Strict,
    legacy_sleep,
)

__all__ = ["AsleepCheck", "FleetConfig", "HttpCall", "OllamaEvict", "PauseConfig",
           "ServeConfig", "SleepApi", "SleepConfig"]

ServiceName = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
]


class DeviceConfig(_Strict):
    """One GPU of `gpu.devices`: several cards on one host, each with its own budget."""

    # The NVML index (or the simulated device's); by default its position in the list.
    index: int | None = Field(default=None, ge=0, le=63)
    # Required for `simulated`; for NVML the fallback total while NVML is unavailable.
    total_mb: int | None = Field(default=None, gt=0)
    # What this card keeps free (a desktop on card 0 only); by default `gpu.reserve_mb`.
    reserve_mb: int | None = Field(default=None, ge=0)


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """A managed device, resolved: its index, total (None: from NVML) and reserve."""

    index: int
    total_mb: int | None
    reserve_mb: int

    @property
    def budget_mb(self) -> int | None:
        return None if self.total_mb is None else self.total_mb - self.reserve_mb


class GpuConfig(_Strict):
    """The `gpu:` section of services.yaml."""

    backend: Literal["auto", "nvml", "simulated"] = "auto"
    # Required for `simulated`; for NVML it is the fallback total used when NVML is unavailable
    # and the daemon runs degraded on declared budgets.
    total_mb: int | None = Field(default=None, gt=0)
    # Headroom never handed out: desktop compositors, CUDA context growth, fragmentation.
    reserve_mb: int = Field(default=0, ge=0)
    device: int = Field(default=0, ge=0)
    # Several GPUs: the cards the daemon plans on (then `device` and `total_mb` are read
    # from the first). Without it, the one card `device`.
    devices: list[DeviceConfig] | None = Field(default=None, min_length=1, max_length=64)
    # Where a service that may run on several cards goes: the fullest card it fits on
    # (`best_fit`, leaving whole cards free for large services) or the emptiest (`spread`).
    placement: Literal["best_fit", "spread"] = "best_fit"
    _cards: tuple[GpuDevice, ...] = PrivateAttr(default=())
    # The poller: slow cadence when idle, fast while a transition waits for VRAM.
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    process_poll_interval_s: float = Field(default=2.0, gt=0, le=60)
    fast_poll_interval_s: float = Field(default=0.1, ge=0.01, le=5)
    # Simulated backend: how long a dead stand-in's memory still counts (driver teardown).
    release_delay_ms: int = Field(default=500, ge=0, le=60000)
    # Simulated backend: what each poll costs (NVML calls take milliseconds), and one slow
    # poll per second on top (a driver lock held elsewhere). 0 = free, as before.
    simulated_poll_cost_ms: float = Field(default=0.0, ge=0, le=1000)
    simulated_slow_poll_ms: float = Field(default=0.0, ge=0, le=5000)

    @property
    def managed(self) -> tuple[GpuDevice, ...]:
        """The devices planned on, first the primary one (`device`)."""
        return self._cards or (GpuDevice(self.device, self.total_mb, self.reserve_mb),)

    @property
    def several(self) -> bool:
        """`devices:` is configured: services get the cards they are placed on."""
        return self.devices is not None

    def gpu(self, index: int) -> GpuDevice | None:
        return next((d for d in self.managed if d.index == index), None)

    @model_validator(mode="after")
    def _check(self) -> GpuConfig:
        if self.devices is not None:
            self._resolve_devices()
        if self.backend == "simulated" and self.total_mb is None:
            raise ValueError("backend 'simulated' needs total_mb")
        if self.total_mb is not None and self.reserve_mb >= self.total_mb:
            raise ValueError(
                f"reserve_mb ({self.reserve_mb}) must be smaller than total_mb ({self.total_mb})"
            )
        return self

    def _resolve_devices(self) -> None:
        for key in ("device", "total_mb"):
            if key in self.model_fields_set:
                raise ValueError(f"with `devices`, give `{key}` per device, not in `gpu:`")
        cards = tuple(GpuDevice(i if d.index is None else d.index, d.total_mb,
                                self.reserve_mb if d.reserve_mb is None else d.reserve_mb)
                      for i, d in enumerate(self.devices or ()))
        seen = [d.index for d in cards]
        dup = sorted({i for i in seen if seen.count(i) > 1})
        if dup:
            raise ValueError(f"devices lists index {', '.join(map(str, dup))} more than once")
        for d in cards:
            if self.backend == "simulated" and d.total_mb is None:
                raise ValueError(f"backend 'simulated' needs total_mb for device {d.index}")
            if d.total_mb is not None and d.reserve_mb >= d.total_mb:
                raise ValueError(f"device {d.index}: reserve_mb ({d.reserve_mb}) must be "
                                 f"smaller than total_mb ({d.total_mb})")
        # Resolved once: the fields below then describe the primary card only.
        self._cards = cards
        # The primary card, for what reads one device (status' `vram`, the legacy routes).
        first = cards[0]
        object.__setattr__(self, "device", first.index)
        object.__setattr__(self, "total_mb", first.total_mb)
        object.__setattr__(self, "reserve_mb", first.reserve_mb)


class HealthConfig(_Strict):
    url: HttpUrl = Field(pattern=r"^https?://")
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    interval_s: float = Field(default=10.0, gt=0, le=3600)
    # None means any 2xx is healthy.
    expected_status: int | None = Field(default=None, ge=100, le=599)
    # While starting, check this often (the first check comes right after launch).
    startup_interval_s: float = Field(default=0.05, ge=0.01, le=10)
    # Consecutive failed checks of a ready service before it is marked unhealthy.
    failure_threshold: int = Field(default=1, ge=1, le=100)


RestartPolicy = Literal["no", "on-failure", "always"]


class _ServiceBase(_Strict):
    vram_mb: int = Field(ge=0)
    priority: int = 0
    health: HealthConfig | None = None
    start_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    stop_timeout_s: float = Field(default=30.0, gt=0, le=600)
    preemptible: bool = True
    restart: RestartPolicy = "no"
    sleep: SleepConfig | None = None
    # On a config reload that changes this service while it runs: use the new definition at
    # its next start, or restart it now.
    on_change: Literal["next-start", "restart"] = "next-start"
    description: str = ""
    # Several GPUs: pinned to one card (`device: 1`), allowed a set (`devices: [0, 1]`), or
    # anywhere (`any`, the default). `gpus: 2`: it needs two cards at once (tensor
    # parallel), `vram_mb` on each.
    device: int | Literal["any"] = "any"
    devices: list[int] | None = Field(default=None, min_length=1)
    gpus: int = Field(default=1, ge=1, le=16)
    # Reached through the daemon's front door (`/v1`, `/svc/<name>`): see config/serve.py.
    serve: ServeConfig | None = None
    # How a release frees its VRAM, first rung that fits: its `sleep:` API, then a
    # cuda-checkpoint (residual 0, all of its VRAM in host RAM), then a stop. Default: its
    # sleep if it has one, then stop. `[checkpoint]` alone: sleep by cuda-checkpoint;
    # `[stop]`: never sleep.
    release: list[Literal["sleep", "checkpoint", "stop"]] | None = Field(
        default=None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        return legacy_sleep(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _ladder(self) -> _ServiceBase:
        rungs = self.release
        if rungs is None:
            return self
        if len(set(rungs)) != len(rungs):
            raise ValueError("release lists a rung more than once")
        if "stop" in rungs and rungs[-1] != "stop":
            raise ValueError("release: stop is the last rung")
        if "sleep" in rungs and self.sleep is None:
            raise ValueError("release lists sleep but the service has no sleep: block")
        if "sleep" in rungs and "checkpoint" in rungs:
            if rungs.index("checkpoint") < rungs.index("sleep"):
                raise ValueError("release: list checkpoint after sleep (a checkpoint frees "
                                 "all of its VRAM, a sleep all but its residual)")
            if self.sleep is not None and self.sleep.api == "cuda-checkpoint":
                raise ValueError("release lists checkpoint, but its sleep is a checkpoint "
                                 "already")
        if "sleep" not in rungs and "checkpoint" not in rungs:
            object.__setattr__(self, "sleep", None)  # `[stop]`: never asleep
        elif "sleep" not in rungs:  # `[checkpoint]`: its sleep is a cuda-checkpoint
            base = {k: getattr(self.sleep, k) for k in ("timeout_s", "wake_timeout_s")} \
                if self.sleep is not None else {}
            object.__setattr__(self, "sleep", SleepConfig(api="cuda-checkpoint", **base))
        return self

    @property
    def checkpoint_fallback(self) -> bool:
        """A cuda-checkpoint after its API sleep (`release: [sleep, checkpoint, ...]`)."""
        return self.release is not None and "sleep" in self.release \
            and "checkpoint" in self.release

    @model_validator(mode="after")
    def _residual(self) -> _ServiceBase:
        sleep = self.sleep
        if sleep is not None and sleep.api == "cuda-checkpoint":
            # a checkpointed process holds nothing on the GPU (its context goes too) and
            # all of its device memory in host RAM, until measured
            object.__setattr__(self, "sleep", sleep.model_copy(update={
                "residual_mb": 0 if sleep.residual_mb is None else sleep.residual_mb,
                "host_ram_mb": self.vram_mb if sleep.host_ram_mb is None
                else sleep.host_ram_mb}))
        elif sleep is not None and sleep.residual_mb is None:
            object.__setattr__(self, "sleep", sleep.model_copy(
                update={"residual_mb": min(1024, self.vram_mb // 4)}))
        return self  # a residual over vram_mb: the loader reports it at its line

    @model_validator(mode="after")
    def _where(self) -> _ServiceBase:
        if self.devices is not None and self.device != "any":
            raise ValueError("give `device` (one card) or `devices` (a set), not both")
        if self.devices is not None and len(set(self.devices)) != len(self.devices):
            raise ValueError("devices lists a card more than once")
        return self

    @property
    def allowed_devices(self) -> tuple[int, ...] | None:
        """The cards it may run on; None: any managed card."""
        if isinstance(self.device, int):
            return (self.device,)
        return None if self.devices is None else tuple(self.devices)

    @property
    def residual_mb(self) -> int | None:
        """What it holds while asleep (the planner's count); None: it cannot sleep."""
        return None if self.sleep is None else self.sleep.residual_mb

    @field_validator("restart", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false; `restart: no` is what people write.
        if v is False:
            return "no"
        return v


class NativeService(_ServiceBase):
    type: Literal["native"]
    command: list[str] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    stop_signal: str = "SIGTERM"

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        # A string is split like a shell would split it, but never run through a shell.
        if isinstance(v, str):
            try:
                return shlex.split(v)
            except ValueError as exc:
                raise ValueError(f"cannot split command: {exc}") from exc
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_str(cls, v: Any) -> Any:
        # `PORT: 8188` in YAML is an int; the environment only holds strings.
        if isinstance(v, dict):
            return {k: (str(x) if isinstance(x, int | float) and not isinstance(x, bool) else x)
                    for k, x in v.items()}
        return v

    @field_validator("stop_signal")
    @classmethod
    def _signal(cls, v: str) -> str:
        name = v.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name not in signal.Signals.__members__:
            raise ValueError(f"unknown signal {v!r}")
        return name


class DeviceRequestConfig(_Strict):
    """Docker's GPU request; the defaults are Compose's `count: all, capabilities: [gpu]`."""

    driver: str = "nvidia"
    count: int = -1
    device_ids: list[str] | None = None
    capabilities: list[list[str]] = Field(default_factory=lambda: [["gpu"]])


class DockerService(_ServiceBase):
    type: Literal["docker"]
    container: str = Field(min_length=1, pattern=r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    # With `image`, a missing container is created; without it, the container must exist.
    image: str | None = None
    command: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    network_mode: str | None = None
    device_request: DeviceRequestConfig | None = None

    @field_validator("command", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return shlex.split(v)
        return v


ServiceConfig = Annotated[NativeService | DockerService, Field(discriminator="type")]


class LeaseConfig(_Strict):
    """Clients (GPUClient, the legacy /gemma routes) holding VRAM for a while."""

    # Client priorities mapped onto the services' scale: IMMEDIATE=1, BACKGROUND=2.
    immediate_priority: int = 90
    background_priority: int = 20
    # A request without vram_mb takes the whole budget (exclusive use, as the old coordinator).
    default_vram_mb: int | None = Field(default=None, ge=0)
    default_ttl_s: float = Field(default=60.0, gt=0, le=86400)
    max_ttl_s: float = Field(default=3600.0, gt=0, le=86400)
    # The legacy wire form cannot renew or wait long: its client times out after 15 s.
    legacy_ttl_s: float = Field(default=600.0, gt=0, le=86400)
    legacy_wait_s: float = Field(default=10.0, ge=0, le=600)
    # The longest an acquire waits for room, whatever `timeout_ms` it asks for: a client
    # that asks for 10 minutes holds a request, a queue slot and a priority claim that long.
    max_wait_s: float = Field(default=600.0, ge=0, le=600)


class HostConfig(_Strict):
    """The host's RAM, which sleeping services fill (weights copied out of VRAM)."""

    # Never handed to sleepers: the OS, page cache, the services' own working sets.
    ram_reserve_mb: int = Field(default=2048, ge=0)
    # The simulated GPU's host: its RAM in all (the real host is read from /proc/meminfo).
    simulated_total_mb: int | None = Field(default=None, gt=0)


class ServicesFile(_Strict):
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    host: HostConfig = Field(default_factory=HostConfig)
    leases: LeaseConfig = Field(default_factory=LeaseConfig)
    # One host of a fleet on Ray (the `fleet` extra); None: this host alone.
    fleet: FleetConfig | None = None
    services: dict[ServiceName, ServiceConfig] = Field(default_factory=dict)
    # Start (or wake) the services of a phase's `next:` in the background after a
    # transition, when they fit beside what runs without moving anything. Off by default:
    # it spends VRAM and power on a guess.
    prewarm: bool = False


class PhaseConfig(_Strict):
    name: str = ""
    services: list[ServiceName] = Field(default_factory=list)
    # Services allowed to stay up through this phase when they still fit.
    keep: list[ServiceName] = Field(default_factory=list)
    # The phase that usually follows: what prewarm (services.yaml `prewarm: true`) readies.
    next: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _disjoint(self) -> PhaseConfig:
        for field in ("services", "keep"):
            names: list[str] = getattr(self, field)
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{field} lists {', '.join(dup)} more than once")
        both = sorted(set(self.services) & set(self.keep))
        if both:
            raise ValueError(f"{', '.join(both)} listed in both services and keep")
        return self


class PhasesFile(_Strict):
    phases: dict[Annotated[int, Field(ge=0)], PhaseConfig] = Field(default_factory=dict)
