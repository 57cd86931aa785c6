"""Automatic restarts: a doubling backoff, a limit per window, and declined restarts retried.

A restart the orchestrator declines (the GPU budget or the lock does not allow it now) is not
a failure of the service: it does not count towards the limit, and it is tried again later
with its own backoff, so a service that crashed while the GPU was busy comes back once the
GPU frees up instead of staying down until someone notices.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    base_s: float = 1.0  # first backoff, doubled per failure in the window
    max_s: float = 60.0
    limit: int = 5  # this many failures within window_s -> failed, no more restarts
    window_s: float = 60.0


@dataclass
class Restarts:
    policy: RestartPolicy
    count: int = 0  # restarts done, for status and metrics
    declines: int = 0  # declined tries since the last restart
    _failures: deque[float] = field(default_factory=deque)

    @property
    def recent(self) -> int:
        return len(self._failures)

    def reset(self) -> None:
        """An explicit start: the operator takes over, the limit starts afresh."""
        self._failures.clear()
        self.declines = 0

    def failed(self) -> float | None:
        """Record a failure; the delay before the next try, or None past the limit."""
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.policy.window_s:
            self._failures.popleft()
        n = len(self._failures)
        if n >= self.policy.limit:
            return None
        return float(min(self.policy.max_s, self.policy.base_s * 2 ** (n - 1)))

    def declined(self) -> float:
        self.declines += 1
        return float(min(self.policy.max_s, self.policy.base_s * 2 ** min(self.declines, 16)))

    def restarted(self) -> None:
        self.count += 1
        self.declines = 0
