"""What the daemon holds of the parts the API installs around it (the front door, the
status cache), as Protocols: the daemon imports neither, so neither imports it back."""

from __future__ import annotations

from typing import Any, Protocol


class RequestDoor(Protocol):
    """The front door (gpu_manager/frontdoor), as the daemon and the status see it."""

    def shutting_down(self, deadline: float) -> None: ...

    def serve_status(self, name: str) -> dict[str, Any] | None: ...


class Invalidates(Protocol):
    """The status cache (api/status_cache.py): told of a change the next read must show."""

    def invalidate(self) -> None: ...


class NoCache:
    """Before the API installs the status cache: nothing to tell."""

    def invalidate(self) -> None:
        return None
