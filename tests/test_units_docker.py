"""Docker units against the real Docker engine, with a locally imported busybox image."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_manager.units import DockerDriver, DockerEngine, ServiceState
from gpu_manager.units.drivers.docker import LABEL
from tests.support.env import TEST_LABEL, free_port
from tests.support.units import Harness, harness

pytestmark = pytest.mark.docker
S = ServiceState


@pytest.fixture
def names(docker_client: Any) -> Iterator[list[str]]:
    """Fresh container names; every container they name is removed afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        with contextlib.suppress(Exception):
            docker_client.containers.get(name).remove(force=True)


def fresh(names: list[str]) -> str:
    name = f"gmt-{uuid.uuid4().hex[:8]}"
    names.append(name)
    return name


@pytest.fixture
async def h(tmp_path: Path, busybox_image: str) -> AsyncIterator[Harness]:
    async with harness(tmp_path) as hh:
        yield hh


async def test_pid1_ignoring_sigterm_stops_within_timeout(
    h: Harness, names: list[str], busybox_image: str, docker_client: Any
) -> None:
    name = fresh(names)
    unit = h.docker("sleeper", container=name, image=busybox_image,
                    command=["sleep", "600"], network_mode="none", stop_timeout_s=1)
    result = await unit.ensure_ready()
    assert result.ok and unit.state == S.READY
    container = docker_client.containers.get(name)
    assert container.status == "running" and container.labels[LABEL] == "sleeper"
    t0 = time.monotonic()
    stopped = await unit.stop()
    elapsed = time.monotonic() - t0
    assert stopped.ok and unit.state == S.STOPPED
    container.reload()
    assert container.status == "exited" and container.attrs["State"]["ExitCode"] == 137
    assert 1.0 <= elapsed <= 1.5, f"stop took {elapsed:.3f}s for a 1 s stop timeout"


async def test_killed_container_is_noticed_within_100ms(
    h: Harness, names: list[str], busybox_image: str, docker_client: Any
) -> None:
    name = fresh(names)
    unit = h.docker("victim", container=name, image=busybox_image,
                    command=["sleep", "600"], network_mode="none")
    assert (await unit.ensure_ready()).ok
    driver = unit.driver
    assert isinstance(driver, DockerDriver)
    waiter = asyncio.create_task(driver.wait_exit())
    other = docker_client.api  # another client: the kill comes from outside the daemon
    t0 = time.monotonic()
    await asyncio.to_thread(other.kill, name)
    info = await waiter
    noticed = time.monotonic() - t0
    assert info.code == 137
    assert noticed <= 0.1, f"death noticed after {noticed * 1000:.0f} ms"
    await h.wait_state(unit, S.FAILED, 2)
    assert "exited with code 137" in unit.reason


async def test_health_checked_container_becomes_ready(
    h: Harness, names: list[str], busybox_image: str
) -> None:
    port = free_port()
    script = (f"mkdir -p /tmp/www && echo ok > /tmp/www/health && "
              f"exec httpd -f -p 127.0.0.1:{port} -h /tmp/www")
    unit = h.docker("web", container=fresh(names), image=busybox_image,
                    command=["sh", "-c", script], network_mode="host", stop_timeout_s=2,
                    health={"url": f"http://127.0.0.1:{port}/health", "interval_s": 0.2})
    result = await unit.ensure_ready()
    assert result.ok, result.reason
    assert unit.reason == "healthy (HTTP 200)"
    driver = unit.driver
    assert isinstance(driver, DockerDriver)
    pids = await driver.pids()
    assert len(pids) == 1 and pids[0] > 1  # host pid of httpd, for matching NVML's list


async def test_clear_errors(h: Harness, names: list[str], busybox_image: str) -> None:
    missing = h.docker("missing", container=fresh(names))
    result = await missing.ensure_ready()
    assert not result.ok and result.reason == (
        f"container {names[-1]!r} does not exist and no image is configured to create it")
    h.engine = DockerEngine(base_url="unix:///nonexistent/docker.sock")
    unreachable = h.docker("offline", container=fresh(names), image=busybox_image)
    result = await unreachable.ensure_ready()
    assert not result.ok and result.reason.startswith("Docker engine unreachable")
    h.engine.close()


async def test_gpu_device_request_is_passed_to_docker(
    h: Harness, names: list[str], busybox_image: str, docker_client: Any
) -> None:
    name = fresh(names)
    unit = h.docker("gpu", container=name, image=busybox_image, command=["sleep", "600"],
                    network_mode="none",
                    device_request={"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]})
    result = await unit.ensure_ready()
    container = docker_client.containers.get(name)
    (req,) = container.attrs["HostConfig"]["DeviceRequests"]
    assert (req["Driver"], req["Count"], req["Capabilities"]) == ("nvidia", -1, [["gpu"]])
    if not result.ok:  # no NVIDIA runtime on this engine: the error says so
        assert "nvidia" in result.reason and unit.state == S.FAILED


async def test_adoption_of_a_running_container(
    h: Harness, names: list[str], busybox_image: str, docker_client: Any
) -> None:
    name = fresh(names)
    first = h.docker("adoptee", container=name, image=busybox_image,
                     command=["sleep", "600"], network_mode="none", stop_timeout_s=1)
    assert (await first.ensure_ready()).ok
    record = h.records["adoptee"]
    assert record is not None and record["kind"] == "docker"
    await first.close()
    second = h.docker("adoptee", container=name, stop_timeout_s=1)
    assert await second.adopt(record)
    await h.wait_state(second, S.READY, 5)
    # a record naming a container that is gone, or is now another container, is not adopted
    third = h.docker("adoptee", container=name)
    assert not await third.adopt({**record, "id": "0" * 64})
    other = fresh(names)
    docker_client.containers.run(busybox_image, ["sleep", "600"], name=other, detach=True,
                                 network_mode="none", labels={TEST_LABEL: "1"})
    assert not await third.adopt({**record, "id": docker_client.containers.get(other).id})
    assert (await second.stop()).ok
    assert docker_client.containers.get(name).status == "exited"
    assert docker_client.containers.get(other).status == "running"  # never touched


async def test_existing_container_without_image_is_started(
    h: Harness, names: list[str], busybox_image: str, docker_client: Any
) -> None:
    name = fresh(names)
    docker_client.containers.create(busybox_image, ["sleep", "600"], name=name,
                                    network_mode="none", labels={TEST_LABEL: "1"})
    unit = h.docker("prebuilt", container=name, stop_timeout_s=1)
    assert (await unit.ensure_ready()).ok
    assert docker_client.containers.get(name).status == "running"
