"""Docker units against the real Docker engine, with a locally imported busybox image."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpu_manager.units import DockerDriver, DockerEngine, DriverError, ServiceState
from gpu_manager.units.drivers.docker import LABEL
from tests.support.env import TEST_LABEL, free_port, until
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


@pytest.mark.parametrize("path", ["replay", "recheck"])
async def test_death_while_the_event_stream_is_down_is_noticed_after_reconnect(
    h: Harness, names: list[str], busybox_image: str, docker_client: Any, path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Either way alone notices it: the stream resumed from the last event (dockerd replays
    the gap), and the re-inspection of every watched container after a reconnect."""
    if path == "replay":
        monkeypatch.setattr(h.engine, "_recheck", lambda client: None)
    name = fresh(names)
    unit = h.docker("gap", container=name, image=busybox_image,
                    command=["sleep", "600"], network_mode="none")
    assert (await unit.ensure_ready()).ok
    driver, engine = unit.driver, h.engine
    assert isinstance(driver, DockerDriver)
    # the pump thread opens the stream on its own time
    await until(lambda: engine.connected, 10, "the event stream to be open")
    # Break the stream and hold the pump before its reconnect: a real gap.
    engine.resume.clear()
    engine._stream.close()
    await until(lambda: not engine.connected, 5, "the event stream to go down")
    await asyncio.to_thread(docker_client.api.kill, name)

    def dead() -> bool:
        return not docker_client.api.inspect_container(name)["State"]["Running"]

    await until(dead, 10, "dockerd to see the container dead")
    assert driver.running(), "the death was seen without the stream: no gap was made"
    t0 = time.monotonic()
    engine.resume.set()
    info = await asyncio.wait_for(driver.wait_exit(), 15)
    print(f"death in the gap noticed {time.monotonic() - t0:.3f}s after the pump was let go "
          f"({info.detail})")
    assert info.code == 137 and engine.reconnects == 1
    assert info.detail == {"replay": "container died",
                           "recheck": "died while the Docker event stream was down"}[path]
    await h.wait_state(unit, S.FAILED, 5)
    await until(lambda: engine.connected, 10, "the event stream to be back")
    # The resumed stream still reports deaths as they happen.
    second = h.docker("after", container=fresh(names), image=busybox_image,
                      command=["sleep", "600"], network_mode="none")
    assert (await second.ensure_ready()).ok
    assert isinstance(second.driver, DockerDriver)
    await asyncio.to_thread(docker_client.api.kill, names[-1])
    assert (await asyncio.wait_for(second.driver.wait_exit(), 5)).code == 137


async def test_engine_refusing_the_start_fails_the_unit_with_its_reason(
    h: Harness, names: list[str], busybox_image: str
) -> None:
    unit = h.docker("nocmd", container=fresh(names), image=busybox_image,
                    command=["no-such-command"], network_mode="none", stop_timeout_s=1)
    result = await asyncio.wait_for(unit.ensure_ready(), 30)
    assert not result.ok and unit.state == S.FAILED
    assert result.reason.startswith(f"cannot start container {names[-1]!r}: "), result.reason
    assert "executable file not found" in result.reason, result.reason
    # The same from the driver: a DriverError carrying the engine's explanation.
    driver = DockerDriver("nocmd2", unit.cfg, h.engine)  # type: ignore[arg-type]
    driver.container_name = names[-1]
    with pytest.raises(DriverError, match="executable file not found"):
        await driver.start()


async def test_engine_errors_are_driver_errors_and_pids_never_hide_them(
    h: Harness, names: list[str], busybox_image: str
) -> None:
    name = fresh(names)
    unit = h.docker("top", container=name, image=busybox_image,
                    command=["sleep", "600"], network_mode="none", stop_timeout_s=1)
    assert (await unit.ensure_ready()).ok
    driver = unit.driver
    assert isinstance(driver, DockerDriver)
    assert len(await driver.pids()) == 1
    # An engine APIError (here: no such container) is a DriverError naming what it was about.
    with pytest.raises(DriverError, match=r"Docker engine error on 'ghost': .*No such container"):
        await h.engine.call(lambda c: c.api.inspect_container("gmt-ghost-0"), about="ghost")
    # The engine goes away while the container runs: pids() says so, never [].
    offline = DockerEngine(base_url="unix:///nonexistent/docker.sock")
    driver.engine = offline
    try:
        with pytest.raises(DriverError, match="Docker engine unreachable"):
            await driver.pids()
    finally:
        driver.engine = h.engine
        offline.close()


async def test_a_placed_container_is_created_on_its_card_and_one_pinned_elsewhere_is_refused(
    h: Harness, names: list[str], busybox_image: str, docker_client: Any
) -> None:
    # The engine here has no NVIDIA runtime, so the start itself fails; what is checked is
    # the container the daemon created: its device request names the placed card, by UUID.
    name = fresh(names)
    unit = h.docker("placed", container=name, image=busybox_image, command=["sleep", "600"],
                    network_mode="none", stop_timeout_s=1,
                    device_request={"driver": "nvidia", "count": -1})
    driver = DockerDriver("placed", unit.cfg, h.engine)  # type: ignore[arg-type]
    driver.visible, driver.cards = ("GPU-simulated-1",), (1,)
    with contextlib.suppress(DriverError):
        await driver.start()
    asked = docker_client.containers.get(name).attrs["HostConfig"]["DeviceRequests"]
    assert [(r["DeviceIDs"], r["Count"]) for r in asked] == [(["GPU-simulated-1"], 0)], asked
    # A container made before, pinned to another card: reported, not silently used.
    other = fresh(names)
    docker_client.containers.create(
        busybox_image, ["sleep", "600"], name=other, network_disabled=True,
        device_requests=[docker.types.DeviceRequest(
            driver="nvidia", device_ids=["GPU-simulated-0"], capabilities=[["gpu"]])])
    elsewhere = DockerDriver("elsewhere", unit.cfg, h.engine)  # type: ignore[arg-type]
    elsewhere.container_name = other
    elsewhere.visible, elsewhere.cards = ("GPU-simulated-1",), (1,)
    with pytest.raises(DriverError, match=r"pinned to GPU GPU-simulated-0 but the plan placed"):
        await elsewhere.start()
    assert docker_client.containers.get(other).status == "created"  # left as it was
    # one that asks for GPUs by count may land on any card: refused as well
    counted = fresh(names)
    docker_client.containers.create(
        busybox_image, ["sleep", "600"], name=counted, network_disabled=True,
        device_requests=[docker.types.DeviceRequest(driver="nvidia", count=-1,
                                                    capabilities=[["gpu"]])])
    anywhere = DockerDriver("anywhere", unit.cfg, h.engine)  # type: ignore[arg-type]
    anywhere.container_name = counted
    anywhere.visible, anywhere.cards = ("GPU-simulated-1",), (1,)
    with pytest.raises(DriverError, match=r"a GPU request by count, not by card"):
        await anywhere.start()
    # placed where it is pinned: used as it is (only the missing NVIDIA runtime fails it)
    elsewhere.visible, elsewhere.cards = ("GPU-simulated-0",), (0,)
    try:
        await elsewhere.start()
    except DriverError as exc:
        assert "pinned to" not in str(exc), exc


async def test_a_failed_launch_never_stops_a_container_it_did_not_start(
    h: Harness, names: list[str], busybox_image: str, docker_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The operator's own container runs under the service's name.
    name = fresh(names)
    docker_client.containers.run(busybox_image, ["sleep", "600"], name=name, detach=True,
                                 network_disabled=True)
    unit = h.docker("svc", container=name, image=busybox_image, command=["sleep", "600"],
                    network_mode="none", stop_timeout_s=1)
    # A driver that neither created, started nor adopted anything stops nothing.
    info = await DockerDriver("svc", unit.cfg, h.engine).stop(1)  # type: ignore[arg-type]
    assert "nothing of it was started" in info.detail
    assert docker_client.containers.get(name).status == "running"
    # Through the unit: the launch finds the container by name and refuses it (as one
    # pinned to another card: the engine here has no GPU runtime to make one, so the
    # refusal is raised where it is made). The unit fails; the container runs on. It used
    # to be stopped by name on the failure path.
    def refuse(*_: Any) -> None:
        raise DriverError(f"container {name!r} exists pinned to GPU 0 but the plan placed "
                          "svc on GPU 1")

    monkeypatch.setattr("gpu_manager.units.drivers.docker.check_cards", refuse)
    result = await unit.ensure_ready()
    assert not result.ok and unit.state == S.FAILED and "pinned to GPU 0" in result.reason
    assert docker_client.containers.get(name).status == "running"
