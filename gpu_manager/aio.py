"""Small asyncio helpers.

Why not `asyncio.wait_for`: on Python 3.11 it can swallow a cancellation that races with the
awaited thing completing (bpo-37658/gh-86296, fixed in 3.12), and a background loop that
misses its cancel keeps a daemon from ever shutting down. `asyncio.timeout` tells its own
expiry from an outside cancel, so we use it everywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` up to `timeout` seconds; True when it is set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def within(aw: Awaitable[T], timeout: float) -> T:
    """`await aw` with a deadline: raises TimeoutError when it passes."""
    async with asyncio.timeout(timeout):
        return await aw
