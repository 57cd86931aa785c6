from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.env import RedisServer

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
