"""The hook a plan's release steps go through so that requests in flight are not cut blindly.

The front door (gpu_manager/frontdoor) implements it: around the release of a service it
serves, new requests wait in its queue, those in flight get up to the service's `drain_s` to
finish, and what is still running then is cut with a clean error. The executor knows only
this protocol, so the orchestrator does not import the front door that calls it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from gpu_manager.planner import Request


class Drainer(Protocol):
    def hold_back(self, name: str, request: Request) -> AbstractAsyncContextManager[list[str]]:
        """Around a release of `name` for `request`: yields notes for the step's record.
        May raise OperationError (an idle release of a service that is busy again)."""
        ...

    def in_use(self) -> frozenset[str]:
        """The services with requests in flight (an equal may not swap them out)."""
        ...

    def drain_bound_s(self, name: str) -> float:
        """The longest `hold_back` may wait before it yields."""
        ...


@contextlib.asynccontextmanager
async def no_drain() -> AsyncIterator[list[str]]:
    yield []
