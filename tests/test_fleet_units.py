"""The fleet's parts without Ray: the pure placement, hosts from Ray's node rows, the
`fleet:` config, the runner against hosts that cannot answer, the routes of a daemon that is
no fleet's, and the single-host fit check a fleet asks (`POST /gpu/acquire/plan`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_manager.api.app import create_app
from gpu_manager.cli.fleet import join_line
from gpu_manager.config import ConfigError, load_inventory
from gpu_manager.config.fleet import FleetConfig
from gpu_manager.fleet.members import Host, MembershipError, StaticMembership, hosts_of
from gpu_manager.fleet.peers import Peers
from gpu_manager.fleet.placement import Option, choose, option, refused
from gpu_manager.fleet.runner import Fleet, FleetError, Target
from gpu_manager.settings import Settings
from tests.support.daemon import write_inventory
from tests.support.env import free_port


def plan(free_after: int, *preempted: str, other_stops: tuple[str, ...] = ()) -> dict[str, Any]:
    steps = [{"action": "stop", "service": n, "preemption": True} for n in preempted]
    steps += [{"action": "stop", "service": n, "preemption": False} for n in other_stops]
    return {"ok": True, "free_after_mb": free_after, "steps": steps}


def test_a_host_that_needs_no_preemption_wins_by_best_fit() -> None:
    opts = [Option("a", 9000), Option("b", 200), Option("c", 50, (("x", 1),))]
    assert choose(opts) == Option("b", 200)  # c leaves less room, but preempts
    assert choose([Option("b", 10), Option("a", 10)]) == Option("a", 10)  # ties: by name
    assert choose([]) is None


def test_else_the_lowest_highest_priority_then_the_fewest_releases() -> None:
    a = Option("a", 100, (("x", 50),))
    b = Option("b", 9000, (("y", 20), ("z", 20)))
    c = Option("c", 9000, (("w", 20),))
    assert choose([a, b]) == b  # 20 < 50, even with two releases
    assert choose([a, b, c]) == c  # 20 as b, one release
    assert choose([Option("d", 500, (("w", 20),)), c]) == Option("d", 500, (("w", 20),))


def test_an_option_counts_only_the_plans_preemptions() -> None:
    got = option("a", plan(700, "ollama", other_stops=("vidi",)), {"ollama": 10, "vidi": 40})
    assert got == Option("a", 700, (("ollama", 10),))
    # a name whose priority is unknown (a client's lease) counts as the highest
    assert option("a", plan(0, "lease:x"), {}).cost[0] > 10**6
    sleeps = {"ok": True, "free_after_mb": 5, "steps": [
        {"action": "sleep", "service": "s", "preemption": True},
        {"action": "start", "service": "t", "preemption": False}]}
    assert option("b", sleeps, {"s": 3}).preempted == (("s", 3),)


def test_a_refusal_keeps_what_the_host_said() -> None:
    r = refused("a", 409, {"error": "insufficient_vram", "detail": "no room", "plan": {
        "short_mb": 1200, "blockers": [{"name": "big", "mb": 12000, "reason": "r"}]}}, None)
    assert (r.error, r.short_mb, r.blockers[0]["name"]) == ("insufficient_vram", 1200, "big")
    assert refused("b", None, None, "unreachable: refused").error == "unreachable"
    lease = refused("c", 409, {"success": False, "session_id": "s", "error": "timed out"}, None)
    assert (lease.error, lease.detail) == ("not_granted", "timed out")


def test_hosts_are_the_labelled_nodes_their_live_one_first() -> None:
    rows = [
        ("n1", False, "10.0.0.1", {"fleet-host": "a", "gpum-port": "8000"}, {}),
        ("n2", True, "10.0.0.2", {"fleet-host": "a", "gpum-port": "8001"},
         {"gpum_vram_mb": 24576.0}),
        ("n3", True, "10.0.0.3", {"other": "x"}, {}),  # a Ray node that is no fleet host
        ("n4", True, "fd00::4", {"fleet-host": "b", "gpum-port": "9000"}, {}),
        ("n5", True, "10.0.0.5", {"fleet-host": "c", "gpum-port": "x"}, {}),  # bad port
    ]
    hosts = hosts_of(rows)
    assert [(h.name, h.node_id, h.url, h.vram_mb) for h in hosts] == [
        ("a", "n2", "http://10.0.0.2:8001", 24576), ("b", "n4", "http://[fd00::4]:9000", None)]
    # a node restarted: its dead entry is kept by Ray; the live one is the host
    again = hosts_of([rows[1], rows[0]])
    assert [h.node_id for h in again] == ["n2"]


def test_the_fleet_section_is_checked_at_its_line(tmp_path: Path) -> None:
    write_inventory(tmp_path, extra_services="fleet:\n  address: \"127.0.0.1:6379\"\n"
                    "  host: \"not a label\"\n")
    with pytest.raises(ConfigError) as info:
        load_inventory(tmp_path)
    [issue] = info.value.issues
    assert issue.file == "services.yaml" and "Ray label value" in issue.message
    assert issue.line == len((tmp_path / "services.yaml").read_text().splitlines())  # host:
    with pytest.raises(ValueError, match="host:port"):
        FleetConfig(address="nowhere", host="a")


def test_the_join_line_labels_the_node() -> None:
    assert join_line("10.0.0.1:6379", "gpu-1", 8000, 24576) == [
        "ray", "start", "--address=10.0.0.1:6379", "--labels",
        "fleet-host=gpu-1,gpum-port=8000", "--resources", '{"gpum_vram_mb": 24576}']
    assert join_line("0.0.0.0:6380", "gpu-0", 8000, None, head=True)[:4] == [
        "ray", "start", "--head", "--port"]


async def test_hosts_that_cannot_answer_are_a_503_naming_them() -> None:
    gone = [Host("a", f"http://127.0.0.1:{free_port()}", "n1", True),
            Host("b", "http://127.0.0.1:1", "n2", False)]
    fleet = Fleet(FleetConfig(address="127.0.0.1:1", host="a"), StaticMembership(gone),
                  Peers(None, 2.0))
    try:
        with pytest.raises(FleetError) as info:
            await fleet.place(Target("phase 1", "/gpu/prepare-phase/1?dry_run=true",
                                     "/gpu/prepare-phase/1"))
        status = await fleet.status()
    finally:
        await fleet.aclose()
    assert (info.value.code, info.value.status) == ("fleet_unavailable", 503)
    assert {h["host"]: h["error"] for h in info.value.extra["hosts"]} == {
        "a": "unreachable", "b": "host_down"}
    assert [(h["host"], h["reachable"]) for h in status["hosts"]] == [("a", False),
                                                                      ("b", False)]


async def test_without_ray_the_status_says_so() -> None:
    class Down(StaticMembership):
        async def hosts(self) -> list[Host]:
            raise MembershipError("Ray at 127.0.0.1:1: unreachable")

    fleet = Fleet(FleetConfig(address="127.0.0.1:1", host="a"), Down([]), Peers(None, 1.0))
    try:
        status = await fleet.status()
        with pytest.raises(FleetError) as info:
            await fleet.place(Target("phase 1", "/p", "/a"))
    finally:
        await fleet.aclose()
    assert status["membership"] == {"ok": False, "error": "Ray at 127.0.0.1:1: unreachable"}
    assert (info.value.code, info.value.status) == ("fleet_unavailable", 503)


@pytest.fixture
async def alone(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process daemon on the root inventory, with no `fleet:`."""
    config = tmp_path / "config"
    write_inventory(config)
    settings = Settings(config_dir=config, state_dir=tmp_path / "state", redis_url=None,
                        token=None, on_shutdown="stop")
    app = create_app(settings, load_inventory(config))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
            timeout=30) as client:
        yield client


async def test_a_daemon_alone_has_no_fleet_and_answers_fit_checks(
        alone: httpx.AsyncClient) -> None:
    r = await alone.get("/fleet/status")
    assert (r.status_code, r.json()["error"]) == (404, "fleet_disabled")
    r = await alone.post("/fleet/acquire", json={"session_id": "s", "requester": "t"})
    assert (r.status_code, r.json()["error"]) == (404, "fleet_disabled")
    # the fit check: a plan, nothing held
    r = await alone.post("/gpu/acquire/plan", json={"vram_mb": 6000})
    assert r.status_code == 200, r.text
    assert r.json()["plan"]["free_after_mb"] == 23552 - 6000
    assert (await alone.get("/gpu/status")).json()["leases"] == []
    r = await alone.post("/gpu/acquire/plan", json={"vram_mb": 30000})
    assert (r.status_code, r.json()["error"]) == (409, "insufficient_vram")
    assert "can ever give" in r.json()["detail"]
    r = await alone.post("/gpu/acquire/plan", json={"vram_mb": 6000, "device": 3})
    assert r.status_code == 422
