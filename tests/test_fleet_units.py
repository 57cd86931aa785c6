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


def test_a_request_preempts_no_more_than_it_allows(repo_root: Path) -> None:
    """`max_preempt`: what a fleet's act carries (the highest priority its dry run
    preempted): a plan that now needs more is refused, naming what it would preempt."""
    from gpu_manager.planner import ObservedState, Plan, PlannerInventory, PreparePhase, plan
    from gpu_manager.planner import Refusal as PlannerRefusal
    from gpu_manager.planner import StartService as Start

    inv = PlannerInventory.from_inventory(load_inventory(repo_root))
    running = ObservedState(24576, {"cosyvoice": None, "ollama": None}, 1024, 0, None)
    free = plan(inv, running, Start("comfyui"))  # 20000 needs both cosyvoice (50), ollama (10)
    assert isinstance(free, Plan) and {s.service for s in free.stops} == {"cosyvoice", "ollama"}
    assert isinstance(plan(inv, running, Start("comfyui", 50)), Plan)
    refused_ = plan(inv, running, Start("comfyui", 10))
    assert isinstance(refused_, PlannerRefusal) and refused_.code == "insufficient_vram"
    assert [b.name for b in refused_.blockers] == ["cosyvoice"]
    assert "would now preempt cosyvoice" in refused_.message
    assert isinstance(plan(inv, running, Start("comfyui", -1)), PlannerRefusal)
    # a phase's own stops (what it does not list) are no preemption: -1 still runs it
    phase = plan(inv, ObservedState(24576, {"vidi": None}, 1024, 0, 2), PreparePhase(3, -1))
    assert isinstance(phase, Plan) and [s.service for s in phase.stops] == ["vidi"]


class Canned(Peers):
    """Hosts that all say yes to the dry run and no (409) to the act: every place is
    stale. Records what each act carried."""

    def __init__(self) -> None:
        super().__init__(None, 1.0)
        self.acts: list[tuple[str, Any]] = []

    async def call(self, host: Host, method: str, path: str, **kw: Any) -> Any:
        from gpu_manager.fleet.peers import Reply

        if path == "/gpu/acquire/plan":
            return Reply(host, 200, {"plan": {"free_after_mb": 100 * len(host.name),
                                              "steps": []}})
        self.acts.append((host.name, kw.get("json")))
        return Reply(host, 409, {"success": False, "session_id": "s", "error": "no room now"})


async def test_when_every_place_is_stale_the_refusal_lists_each() -> None:
    import time

    hosts = [Host("a", "http://a", "n1", True), Host("bb", "http://bb", "n2", True)]
    peers = Canned()
    fleet = Fleet(FleetConfig(address="127.0.0.1:1", host="a", attempts=3),
                  StaticMembership(hosts), peers)
    target = Target("a lease", "/gpu/acquire/plan", "/gpu/acquire", act_body={"vram_mb": 1},
                    lease=True, deadline=time.monotonic() + 30)
    with pytest.raises(FleetError) as info:
        await fleet.place(target)
    assert (info.value.code, info.value.status) == ("insufficient_vram", 409)
    assert [h["host"] for h in info.value.extra["hosts"]] == ["a", "bb"]
    assert "a: not_granted (no room now)" in info.value.detail
    # best fit first (a: 100 MB left); each act allows no preemption; only the last place
    # tried (no other host left) waits for room, within what is left of the deadline
    assert [(n, b["max_preempt"], b["wait"]) for n, b in peers.acts] == [
        ("a", -1, False), ("bb", -1, True)]
    assert 0 < peers.acts[1][1]["timeout_ms"] <= 30_000


async def test_a_retry_joins_the_placement_and_a_grant_nobody_got_is_released() -> None:
    import asyncio

    from gpu_manager.fleet.acquires import FleetAcquires
    from gpu_manager.fleet.peers import Reply
    from gpu_manager.fleet.placement import Option
    from gpu_manager.fleet.runner import Placed

    host = Host("a", "http://a", "n1", True)
    released: list[Any] = []

    class Releases(Peers):
        async def call(self, host: Host, method: str, path: str, **kw: Any) -> Any:
            released.append((host.name, path, kw.get("json")))
            return Reply(host, 200, {"success": True})

    fleet = Fleet(FleetConfig(address="127.0.0.1:1", host="a"), StaticMembership([host]),
                  Releases(None, 1.0))
    acquires = FleetAcquires(fleet)
    gate = asyncio.Event()
    starts = 0

    async def place() -> Placed:
        nonlocal starts
        starts += 1
        await gate.wait()
        return Placed(host, Option("a", 0), [], [], [],
                      Reply(host, 200, {"success": True, "session_id": "s1"}))

    async def gone() -> bool:
        return False

    first = asyncio.create_task(acquires.acquire("s1", place, gone))  # its client left
    await asyncio.sleep(0)
    second = asyncio.create_task(acquires.acquire("s1", place, gone))  # its retry too
    await asyncio.sleep(0)
    gate.set()
    a, b = await asyncio.gather(first, second)
    assert a is b and starts == 1
    await asyncio.wait_for(acquires.aclose(), 5)
    assert released == [("a", "/gpu/release", {"session_id": "s1"})]


async def test_a_bad_host_url_is_an_answer_not_an_error() -> None:
    peers = Peers(None, 1.0)
    try:
        reply = await peers.call(Host("x", "http://127.0.0.1:99999", "n", True), "GET", "/")
    finally:
        await peers.aclose()
    assert reply.status is None and reply.error and not reply.sent
    assert hosts_of([("n", True, "h", {"fleet-host": "x", "gpum-port": "99999"}, {})]) == []


async def test_an_acquire_that_may_not_wait_is_refused_at_once(
        alone: httpx.AsyncClient) -> None:
    import time

    r = await alone.post("/gpu/acquire", json={"session_id": "big", "requester": "t",
                                               "vram_mb": 20000})
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    r = await alone.post("/gpu/acquire", json={"session_id": "no-wait", "requester": "t",
                                               "vram_mb": 10000, "timeout_ms": 20000,
                                               "wait": False})
    assert r.status_code == 409 and not r.json()["success"]
    assert time.monotonic() - t0 < 5  # not the 20 s it was allowed
    assert [x["session_id"] for x in (await alone.get("/gpu/status")).json()["leases"]] == [
        "big"]
