"""`GET /gpu/status`'s body, built and serialised once per change of what it shows.

Why: building the status (`api/status.py`) costs ~40 us and FastAPI's validation and
serialisation of the dict ~10 us more, per request, while nothing it shows changes between
most requests: the poller publishes every 100 ms in fast mode (every 1 s else), the lock is
read every 250 ms, units and leases change when something happens. So the route sends these
bytes as they are.

Why it cannot go stale. A body is reused only while
- its *fingerprint* is unchanged: cheap markers, read before the build, of the state the
  status shows, each one of which changes whenever its owner writes:
  - the poller's snapshot (a new object per poll: every reading, processes and probe errors),
  - the event bus's last id (every unit state change or new reason, lease, operation and lock
    event is published there),
  - the ledger's view (rebuilt after every write: pids, releases, leases),
  - the inventory (a reload swaps it), the lock info and when it was read, the lock keeper's
    holders and doubt, the prewarmed set, the current phase, the leases' waiting queue,
    the host RAM sample (taken once a second);
  the markers themselves are kept, not their ids, so a freed object's id reused by a new one
  cannot pass for it;
- and it is younger than `MAX_AGE_S`: the safety net for what has no marker (a unit's last
  health detail or fault count, a process that outlived a failed stop, an operation that
  timed out in the queue without an event), shown at most that late: less than the status
  lags already, its snapshot being up to a poll interval old (100 ms in fast mode, 1 s else).
The fingerprint is read *before* the build: a change landing after that read makes the stored
fingerprint old, so the next request builds again (the opposite order could store a new
fingerprint with an old body).

For other components: whatever adds to the status something none of the markers covers calls
`daemon.status_cache.invalidate()` after a change that the next read must show (a per-request
counter, requests in flight say, can instead rely on `MAX_AGE_S`: invalidating per request
would build the body per request again).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic_core import to_json

from gpu_manager.api.status import status

if TYPE_CHECKING:
    from gpu_manager.daemon import Daemon

# The staleness bound for what no fingerprint marker covers (see above); building once per
# MAX_AGE_S costs ~0.05% of a core.
MAX_AGE_S = 0.1


class StatusCache:
    def __init__(self, daemon: Daemon, max_age_s: float = MAX_AGE_S) -> None:
        self._daemon = daemon
        self.max_age_s = max_age_s
        self._generation = 0  # bumped by invalidate(): part of the fingerprint
        self._key: tuple[object, ...] | None = None
        self._body = b""
        self._built_at = float("-inf")  # time.monotonic()
        self.builds = 0  # how many bodies were built (tests, benchmarks)

    def invalidate(self) -> None:
        """The next read builds a new body. A counter, not a flag, so that a build that read
        the state before this call is not taken for one that came after."""
        self._generation += 1

    def body(self) -> bytes:
        """The status as JSON bytes, as FastAPI would have serialised `status(daemon)`
        (pydantic's serialiser: the same bytes, a NaN or infinity as null)."""
        key = self._fingerprint()  # first: see the module's docstring
        now = time.monotonic()
        if key != self._key or now - self._built_at >= self.max_age_s:
            self._body = to_json(status(self._daemon))
            self._key, self._built_at = key, now
            self.builds += 1
        return self._body

    def _fingerprint(self) -> tuple[object, ...]:
        d = self._daemon
        orch = d.orchestrator
        keeper = orch.keeper
        return (self._generation, d.poller.latest, d.bus.last_id, orch.ledger.view(),
                orch.inventory, d.lock_info, d.lock_checked_at, keeper.holders, keeper.doubt,
                orch.prewarmed, orch.current_phase, d.leases.waiting, orch.host_free_mb())
