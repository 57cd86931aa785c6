"""/gpu/status is built once per change of what it shows, not per request (api/status_cache.py):
whatever changed, the very next read shows it.

The daemon runs in this process (the ASGI app, its lifespan) with the cache's max age taken
away, so that only the fingerprint (or `invalidate()`) can bring a new body: a change the
fingerprint misses fails here instead of hiding behind the 100 ms safety net.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter

from gpu_manager.api.app import create_app
from gpu_manager.api.status import status
from gpu_manager.config import load_inventory
from gpu_manager.daemon import Daemon
from gpu_manager.settings import Settings
from gpu_manager.units import Event
from tests.support.daemon import write_inventory

FOREVER = 3600.0
# what FastAPI made of the dict the route returned before the cache (`-> dict[str, Any]`)
AS_FASTAPI = TypeAdapter(dict[str, Any])


@dataclasses.dataclass
class Live:
    daemon: Daemon
    client: httpx.AsyncClient
    config_dir: Path

    async def status(self) -> dict[str, Any]:
        r = await self.client.get("/gpu/status")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        body: dict[str, Any] = r.json()
        return body

    async def post(self, path: str, **kw: Any) -> httpx.Response:
        r = await self.client.post(path, **kw)
        assert r.status_code == 200, r.text
        return r


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    config = tmp_path / "config"
    write_inventory(config)
    settings = Settings(config_dir=config, state_dir=tmp_path / "state", redis_url=None,
                        token=None, on_shutdown="stop")  # stop: no stand-in outlives the test
    app = create_app(settings, load_inventory(config))
    daemon: Daemon = app.state.daemon
    daemon.status_cache.max_age_s = FOREVER
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1",
                                     timeout=60) as client:
            yield Live(daemon, client, config)


def fresh(d: Daemon) -> bytes:
    """What a build now gives, serialised as FastAPI serialised the status before the cache."""
    return AS_FASTAPI.dump_json(status(d), by_alias=True)


async def test_the_body_is_reused_while_nothing_it_shows_changes(live: Live) -> None:
    cache = live.daemon.status_cache
    body = await live.client.get("/gpu/status")
    # (synchronous from here: nothing else runs in between)
    first, builds = cache.body(), cache.builds
    assert first == fresh(live.daemon)
    assert cache.body() is first and cache.builds == builds
    assert body.json().keys() == {
        "vram", "gpus", "placement", "host", "services", "lock", "phase", "leases", "waiting",
        "sleeping", "prewarmed", "operations", "phases"}


def _snapshot(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    # the poller is the snapshot's one writer and has no setter: a new poll's result
    snap = d.poller.latest
    mp.setattr(d.poller, "_latest", dataclasses.replace(snap, wall_time=snap.wall_time + 1))


def _event(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    # what a unit publishes with each change of state or reason (units/owner.py)
    d.bus.publish(Event("state", "cosyvoice", {"state": "stopped", "previous": "stopped",
                                               "reason": "a new reason"}))


def _ledger(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    d.orchestrator.ledger.set_pids({}, {"cosyvoice": "cannot read its pids"})


def _lock_info(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(d, "lock_info", dataclasses.replace(d.lock_info, holder="legacy-script"))


def _lock_checked(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(d, "lock_checked_at", d.lock_checked_at + 1)


def _holders(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(d.orchestrator.keeper, "_holders", {"lease:job"})


def _phase(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(d.orchestrator, "current_phase", 5)


def _prewarmed(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    mp.setattr(d.orchestrator, "prewarmed", frozenset({"cosyvoice"}))


def _waiting(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    # an acquire waiting for room (leases.py's queue of waiters)
    mp.setattr(d.leases, "_queue", [SimpleNamespace(session_id="job")])


def _invalidate(d: Daemon, mp: pytest.MonkeyPatch) -> None:
    d.status_cache.invalidate()


@pytest.mark.parametrize("change", [_snapshot, _event, _ledger, _lock_info, _lock_checked,
                                    _holders, _phase, _prewarmed, _waiting, _invalidate],
                         ids=lambda f: f.__name__.strip("_"))
async def test_each_kind_of_change_brings_a_new_body_at_the_next_read(
        live: Live, monkeypatch: pytest.MonkeyPatch,
        change: Callable[[Daemon, pytest.MonkeyPatch], None]) -> None:
    d, cache = live.daemon, live.daemon.status_cache
    cache.body()
    builds = cache.builds
    change(d, monkeypatch)
    # (no await since the change: the body can only come from the cache's own decision)
    assert cache.body() == fresh(d)
    assert cache.builds == builds + 1
    assert cache.body() is cache.body() and cache.builds == builds + 1


async def test_with_nothing_to_see_a_body_is_built_again_after_its_max_age(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = live.daemon.status_cache
    monkeypatch.setattr(cache, "_fingerprint", lambda: ("nothing changes",))
    cache.max_age_s = 0.05
    first = cache.body()
    assert cache.body() is first
    await asyncio.sleep(0.06)
    assert cache.body() is not first


async def test_a_change_through_the_api_shows_at_the_very_next_read(live: Live) -> None:
    before = await live.status()
    assert before["services"]["cosyvoice"]["state"] == "stopped" and before["leases"] == []

    await live.post("/gpu/service/cosyvoice/start")
    s = await live.status()
    assert s["services"]["cosyvoice"]["state"] == "ready"

    await live.post("/gpu/acquire", json={"session_id": "job", "requester": "ml",
                                          "vram_mb": 1000})
    s = await live.status()
    assert [x["session_id"] for x in s["leases"]] == ["job"]
    assert s["lock"]["held_for"]["leases"] == ["job"]

    await live.post("/gpu/release", json={"session_id": "job"})
    s = await live.status()
    assert s["leases"] == [] and s["lock"]["held_for"]["leases"] == []

    await live.post("/gpu/service/cosyvoice/stop")
    s = await live.status()
    assert s["services"]["cosyvoice"]["state"] == "stopped"

    await live.post("/gpu/prepare-phase/3")
    s = await live.status()
    assert s["phase"] == 3 and s["services"]["cosyvoice"]["state"] == "ready"

    phases = live.config_dir / "phases.yaml"
    phases.write_text(phases.read_text() + "  6:\n    name: extra\n    services: []\n")
    await live.post("/gpu/reload")
    s = await live.status()
    assert s["phases"]["6"]["name"] == "extra"
