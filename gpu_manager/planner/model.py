"""Planner inputs and outputs: plain frozen data, no I/O, cheap to build in tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gpu_manager.config import Inventory


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    vram_mb: int
    priority: int = 0
    preemptible: bool = True
    # False for client leases: VRAM a plan counts but never stops (only the client frees it).
    stoppable: bool = True
    # What it keeps on the GPU while asleep (its `sleep:` block); None: it cannot sleep.
    residual_mb: int | None = None
    # Several GPUs: the cards it may be placed on (None: any), and how many it needs at once
    # (`vram_mb` on each).
    devices: tuple[int, ...] | None = None
    gpus: int = 1
    # Host RAM its sleep holds (measured, else declared): a sleep the host cannot hold is a
    # stop (`ObservedState.host_free_mb`).
    host_ram_mb: int = 0
    # Learned: the median of its measured cold starts and wakes (None: not measured yet).
    # Among victims of equal priority, the cheapest to bring back goes first.
    start_s: float | None = None
    wake_s: float | None = None
    # Why it cannot sleep here although it has a `sleep:` block (its sleep needs what this
    # host lacks); the plan's stop says it.
    no_sleep: str | None = None
    # A cuda-checkpoint after its API sleep (`release: [sleep, checkpoint]`): residual 0,
    # all of its VRAM in host RAM; the rung taken when its sleep's residual is in the way.
    deep: bool = False

    def back_in(self, asleep: bool) -> float | None:
        """What bringing it back is expected to take: its wake if asleep, else its start."""
        return (self.wake_s if asleep else None) or self.start_s


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    number: int
    name: str = ""
    services: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()
    next: int | None = None


@dataclass(frozen=True, slots=True)
class PlannerInventory:
    services: Mapping[str, ServiceSpec]
    phases: Mapping[int, PhaseSpec] = field(default_factory=dict)

    @classmethod
    def from_inventory(cls, inv: Inventory) -> PlannerInventory:
        services = {
            name: ServiceSpec(name, s.vram_mb, s.priority, s.preemptible,
                              residual_mb=s.residual_mb, devices=s.allowed_devices,
                              gpus=s.gpus, host_ram_mb=(s.sleep.host_ram_mb or 0)
                              if s.sleep is not None else 0, deep=s.checkpoint_fallback)
            for name, s in inv.services.items()
        }
        phases = {
            n: PhaseSpec(n, p.name, tuple(p.services), tuple(p.keep), p.next)
            for n, p in inv.phases.items()
        }
        return cls(services, phases)


@dataclass(frozen=True, slots=True)
class DeviceBudget:
    """One card's side of `ObservedState` when there are several."""

    total_mb: int
    reserve_mb: int = 0
    foreign_mb: int = 0

    @property
    def budget_mb(self) -> int:
        return self.total_mb - self.reserve_mb - self.foreign_mb


@dataclass(frozen=True, slots=True)
class ObservedState:
    """What runs now and what the GPU has.

    `running` maps each service that holds (or may hold) VRAM to its measured MB, or None when
    the probe cannot attribute memory to it. A name not in the inventory (e.g. removed by a
    reload but still up) is counted with its measured MB and never touched by a plan.
    """

    total_mb: int
    running: Mapping[str, int | None] = field(default_factory=dict)
    reserve_mb: int = 0
    # VRAM used by processes the daemon does not manage (a desktop, an unmanaged job).
    foreign_mb: int = 0
    current_phase: int | None = None
    # Services asleep: their process runs with only its residual on the GPU (measured MB, or
    # None when the probe cannot attribute memory: then the declared residual counts). Not
    # in `running`; a stop frees the residual, a wake takes the rest back.
    sleeping: Mapping[str, int | None] = field(default_factory=dict)
    # Services in `running` (their process holds VRAM) that are not serving: failed, with a
    # process its stop could not end. A start or a phase that wants one stops it and starts
    # it again (the start waits for the stop's VRAM, as any start does).
    unready: frozenset[str] = frozenset()
    # Several GPUs (two or more entries): each card's budget, and the cards each running or
    # sleeping service holds (its MB, measured or declared, is split evenly over them). The
    # scalar fields above are then the sums. Empty: one card, as above.
    devices: Mapping[int, DeviceBudget] = field(default_factory=dict)
    placement: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # What the probe measured of a multi-card service on each of its cards (uneven splits,
    # e.g. `device_map=auto`); absent: its MB split evenly.
    card_mb: Mapping[str, Mapping[int, int | None]] = field(default_factory=dict)
    strategy: Literal["best_fit", "spread"] = "best_fit"
    # Services with requests in flight (or waiting) at the front door: a request's start
    # may swap out an idle service of its own priority, never one of these.
    in_use: frozenset[str] = frozenset()
    # Host RAM free for what new sleeps hold (available less `host.ram_reserve_mb`); None:
    # not budgeted (no figure).
    host_free_mb: int | None = None

    @property
    def budget_mb(self) -> int:
        return self.total_mb - self.reserve_mb - self.foreign_mb


@dataclass(frozen=True, slots=True)
class PreparePhase:
    phase: int
    # The highest priority this request may preempt (-1: none); None: any the rules allow.
    # A fleet sends what the host's dry run promised: a plan that now needs more is refused
    # (it was stale) instead of preempting more than the placement chose to.
    max_preempt: int | None = None


@dataclass(frozen=True, slots=True)
class StartService:
    name: str
    max_preempt: int | None = None  # as PreparePhase's


@dataclass(frozen=True, slots=True)
class StopService:
    name: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class StopAll:
    pass


@dataclass(frozen=True, slots=True)
class SleepService:
    name: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class Prewarm:
    """Start (or wake) the services of `phase` (or `services`) that fit beside what runs,
    moving nothing: prewarm, and waking sleepers that asked to be woken when there is room."""

    phase: int | None
    services: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestStart(StartService):
    """A start (or wake) caused by a request at the front door (`reason: request`): planned as
    any start, preempting only lower priorities; its own kind in events, metrics and the
    operations list."""

    reason: Literal["request"] = "request"


@dataclass(frozen=True, slots=True)
class IdleSleep(SleepService):
    """The front door's idle release of a service that can sleep (`reason: idle`)."""

    reason: Literal["idle"] = "idle"


@dataclass(frozen=True, slots=True)
class IdleStop(StopService):
    """The front door's idle release of a service that cannot sleep (`reason: idle`)."""

    reason: Literal["idle"] = "idle"


Request = PreparePhase | StartService | StopService | StopAll | SleepService | Prewarm
Action = Literal["stop", "sleep", "start", "wake"]
RELEASES = frozenset({"stop", "sleep"})


@dataclass(frozen=True, slots=True)
class Step:
    action: Action
    service: str
    # MB this step frees (stop, sleep: all but the residual) or needs (start; wake: all but
    # what it still holds asleep).
    mb: int
    reason: str
    # True when the stop (or sleep) exists only to make room for a higher-priority start.
    preemption: bool = False
    # Indices (in Plan.steps) of the steps this one waits for: for a start, the stops whose
    # VRAM it needs (and its own stop, when it is started again). Everything else runs at
    # once: the stops side by side, a start that fits beside what still runs right away.
    after: tuple[int, ...] = ()
    # The cards it acts on (several GPUs only): where a start is placed, what a stop frees.
    devices: tuple[int, ...] = ()
    # A sleep by its ladder's second rung, a cuda-checkpoint ("checkpoint"); "": its sleep.
    how: str = ""

    def __str__(self) -> str:
        verb = "frees" if self.action in RELEASES else "needs"
        return f"{self.action} {self.service}: {self.reason} ({verb} {self.mb} MB)"


@dataclass(frozen=True, slots=True)
class Plan:
    request: Request
    steps: tuple[Step, ...]
    budget_mb: int
    used_before_mb: int
    used_after_mb: int

    @property
    def stops(self) -> tuple[Step, ...]:
        """The steps that free VRAM: stops and sleeps."""
        return tuple(s for s in self.steps if s.action in RELEASES)

    @property
    def starts(self) -> tuple[Step, ...]:
        """The steps that take VRAM: starts and wakes."""
        return tuple(s for s in self.steps if s.action not in RELEASES)

    @property
    def free_after_mb(self) -> int:
        return self.budget_mb - self.used_after_mb


@dataclass(frozen=True, slots=True)
class Blocker:
    name: str
    mb: int
    reason: str
    device: int | None = None  # the card it blocks (several GPUs only)


RefusalCode = Literal["insufficient_vram", "unknown_service", "unknown_phase", "needed_by_phase",
                      "unmanaged_device",
                      "cannot_sleep", "not_running"]


@dataclass(frozen=True, slots=True)
class Refusal:
    request: Request
    code: RefusalCode
    message: str
    blockers: tuple[Blocker, ...] = ()
    short_mb: int = 0
