from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.faults.fakes import World, base_config


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Real daemon parts on the fakes, over the fake host's inventory."""
    base_config(tmp_path)
    w = World(tmp_path)
    await w.start()
    try:
        yield w
    finally:
        await w.close()
