"""The real parts the suite relies on: a real redis-server and a real Docker engine.

These guard the harness itself: if the fixtures quietly stopped providing real servers, every
later Redis/Docker test would be meaningless.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.env import TEST_LABEL, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.mark.redis
async def test_real_redis_expires_an_nx_key(redis_client: Any) -> None:
    assert await redis_client.set("gpu_mutex", "a", nx=True, px=300)
    # NX refuses a second holder: the property every GPU lock here is built on.
    assert not await redis_client.set("gpu_mutex", "b", nx=True, px=300)
    assert await redis_client.get("gpu_mutex") == "a"
    ttl = await redis_client.pttl("gpu_mutex")
    assert 0 < ttl <= 300
    deadline = time.monotonic() + 3
    while await redis_client.exists("gpu_mutex"):
        assert time.monotonic() < deadline, "key did not expire at its TTL"
        await asyncio.sleep(0.02)
    assert await redis_client.set("gpu_mutex", "b", nx=True, px=300)


@pytest.mark.docker
def test_real_container_runs_and_is_killed_after_its_stop_timeout(
    docker_client: Any, busybox_image: str
) -> None:
    container = docker_client.containers.run(
        busybox_image, ["sleep", "600"], detach=True, network_mode="none",
        labels={TEST_LABEL: "1"},
    )
    try:
        def running() -> bool:
            container.reload()
            return bool(container.status == "running")

        wait_for(running, 10, "the container to run")
        # `sleep` as PID 1 has no SIGTERM handler, so the kernel ignores SIGTERM for it and
        # Docker must escalate to SIGKILL after the timeout.
        t0 = time.monotonic()
        container.stop(timeout=1)
        elapsed = time.monotonic() - t0
        container.reload()
        assert container.status == "exited"
        assert container.attrs["State"]["ExitCode"] == 137
        assert 0.9 <= elapsed < 5, elapsed
    finally:
        container.remove(force=True)
