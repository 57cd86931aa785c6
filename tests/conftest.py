from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpu_manager.units.drivers.native import MARKER_ENV
from tests.support.env import RedisServer
from tests.support.standins import sim, workloads  # noqa: F401 - the stand-in tests' fixtures

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> Any:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server.url, decode_responses=True)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    from tests.support.docker_env import docker_client as connect
    from tests.support.docker_env import remove_test_containers

    client = connect()
    remove_test_containers(client)
    try:
        yield client
    finally:
        remove_test_containers(client)
        client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: Any) -> str:
    from tests.support.docker_env import ensure_busybox_image

    return ensure_busybox_image(docker_client)


# -- tests leave nothing behind ----------------------------------------------------------------
def _leftovers(session: pytest.Session) -> list[psutil.Process]:
    """Processes a test started that outlived the session: our own children still running,
    and stand-ins launched by a test's daemon (tagged with a unit token, their registry under
    this session's temporary directory) that its daemon left behind."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    base = str(factory.getbasetemp()) if factory is not None else None
    me = psutil.Process()
    found: dict[int, psutil.Process] = {}
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            # `./dev test` execs into pytest, so what it started before (dockerd) is our
            # child too: only children born after the session began are a test's
            if child.status() != psutil.STATUS_ZOMBIE \
                    and child.create_time() >= _SESSION["start"] - 1.0:
                found[child.pid] = child
    if base is not None:
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                env = proc.environ()
                if env.get(MARKER_ENV) and base in env.get("GPU_MANAGER_SIM_DIR", "") \
                        and proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
    return list(found.values())


_SESSION = {"start": time.time()}


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION["start"] = time.time()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = _leftovers(session)
    if not left:
        return
    lines = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            lines.append(f"  pid {proc.pid}: {' '.join(proc.cmdline())[:160]}")
            proc.kill()
    print("\nprocesses started by tests outlived the session (killed now):\n"
          + "\n".join(lines), file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
