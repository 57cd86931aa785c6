"""Every deadline the daemon puts on something outside its process, in one place.

The inventory gives each service its start and stop timeouts; these are the fixed margins
around them and the deadlines of calls that have no per-service setting. One object so that
a deployment can see them all, and the fault-injection tests can shrink them (a hang then
costs a test a second, not a minute) without patching constants module by module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Bounds:
    # After SIGKILL a driver waits up to 5 s for the processes to go: a stop may take this
    # long beyond the service's stop timeout before it counts as hung.
    kill_grace_s: float = 6.0
    # Slack on a caller's wait for a unit's answer, over the unit's own deadlines.
    answer_margin_s: float = 2.0
    # Adopting a unit, or taking a changed definition (both quick unless something hangs).
    unit_call_s: float = 10.0
    # One call to the lock backend (Redis: 2 s socket timeout, plus slack).
    lock_io_s: float = 5.0
    # Reading a unit's pids (a /proc walk, or `docker top`).
    pids_s: float = 5.0
    # Slack over a preemption strategy's own timeouts (Ollama unload, cooperative pause).
    strategy_margin_s: float = 2.0
    # Resuming a paused service.
    resume_s: float = 15.0
    # One GPU sample by the poller's thread (NVML calls take milliseconds when healthy).
    probe_sample_s: float = 5.0
    # Each step of the daemon's own shutdown.
    shutdown_step_s: float = 5.0
    # Starting the probe (nvmlInit can take seconds on a card without persistence mode) and
    # scanning /proc for what a previous daemon launched, at start-up.
    startup_step_s: float = 30.0
    # After the bounded shutdown, a thread still stuck in a driver call (NVML, Docker, a
    # /proc read of a process in uninterruptible sleep) would keep the interpreter from
    # exiting; past this the process exits anyway.
    exit_watchdog_s: float = 10.0

    @classmethod
    def fast(cls) -> Bounds:
        """Tight margins for tests that inject hangs."""
        return cls(kill_grace_s=0.3, answer_margin_s=0.3, unit_call_s=1.0, lock_io_s=0.5,
                   pids_s=0.3, strategy_margin_s=0.2, resume_s=0.5, probe_sample_s=0.5,
                   shutdown_step_s=1.0, startup_step_s=2.0, exit_watchdog_s=2.0)


DEFAULT = Bounds()
