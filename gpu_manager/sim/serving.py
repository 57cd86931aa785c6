"""How busy a stand-in is, and how it answers inference: the load the simulated probe reports.

A stand-in is busy (its registration's SM utilisation is non-zero) while it answers an
inference request, and for a `/sim/busy` period. Both are written to the simulated GPU's
registry: one write when a request starts and one when it ends, so the probe sees the load
of every stand-in without asking any of them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from gpu_manager.sim.registry import SimRegistry

DEFAULT_UTIL_PCT = 90


class Busy:
    """Counts this process's in-flight inference requests and records its load.

    Without a registry (`--cuda`: the real driver measures the load) it only counts.
    """

    def __init__(self, registry: SimRegistry | None = None, pid: int | None = None,
                 util_pct: int = DEFAULT_UTIL_PCT) -> None:
        self.registry = registry
        self.pid = os.getpid() if pid is None else pid
        self.util_pct = util_pct
        self.in_flight = 0
        # Held across the registry write, so the last count written is the current one (two
        # threads could otherwise write their counts in the opposite order).
        self._lock = threading.Lock()

    def _record(self) -> None:
        if self.registry is not None:
            with contextlib.suppress(LookupError):  # unregistered: nothing to report on
                self.registry.set_in_flight(self.pid, self.in_flight, self.util_pct)

    def start(self) -> None:
        with self._lock:
            self.in_flight += 1
            self._record()

    def end(self) -> None:
        with self._lock:
            self.in_flight = max(self.in_flight - 1, 0)
            self._record()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.end()

    def hold(self, seconds: float, util_pct: int) -> float | None:
        """Be busy at `util_pct` for `seconds` with no request: the wall time it ends, or
        None when there is no simulated registration to record it in."""
        if self.registry is None:
            return None
        until = time.time() + seconds
        try:
            self.registry.set_busy(self.pid, until, util_pct)
        except LookupError:
            return None
        return until


@dataclass(frozen=True)
class Serving:
    """How a stand-in answers inference requests."""

    name: str  # who the fixed reply says hello from
    token_s: float = 0.0  # time per generated token (and per ComfyUI step)
    steps: int = 5  # ComfyUI: sampler steps per prompt
    # The model's context in tokens (a prompt's words here): more asked is a 400. None: no
    # limit (before the real server showed its 400, the stand-ins had none).
    context_tokens: int | None = None
    busy: Busy = field(default_factory=Busy)
