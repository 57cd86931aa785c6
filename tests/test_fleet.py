"""The fleet (#25) on one machine: three real daemons on simulated GPUs of 24, 16 and 8 GB,
each the host of one Ray node on loopback (tests/support/fleet.py), one Ray cluster for the
module. Clients are the real ones: httpx on the fleet routes, `GPUClient(fleet=True)`, and
Ray itself for `gpu_manager.fleet.remote` tasks and actors.

Budgets (total less the 1024 MB reserve): a 23552, b 15360, c 7168. Every host declares
`small` (3000, priority 20) and `tts` (4000, 60); a and b also `big` (12000, 50): c's card
cannot hold it. Phase 9 runs tts and keeps big and small where they fit beside it. The last
test removes c's node: tests that need c come before it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from gpu_manager.client import GPUClient
from tests.support.daemon import DaemonProc
from tests.support.env import wait_for
from tests.support.fleet import FleetHosts, fleet_on_loopback

pytestmark = pytest.mark.timeout(240)
SIZES = {"a": 24576, "b": 16384, "c": 8192}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetHosts]:
    with fleet_on_loopback(tmp_path_factory.mktemp("fleet"), SIZES) as hosts:
        yield hosts


@pytest.fixture
def clean(fleet: FleetHosts) -> Iterator[FleetHosts]:
    """Each test starts and ends with every host's GPU empty: no service, no lease."""
    yield fleet
    for d in fleet.daemons.values():
        if d.proc is None or d.proc.poll() is not None:
            continue
        d.post("/gpu/release-all")
        for lease in d.status()["leases"]:
            d.post("/gpu/release", json={"session_id": lease["session_id"]})
        wait_for(lambda d=d: not d.status()["leases"], 10, "the leases released")


def lease_event(d: DaemonProc, session_id: str, status: str) -> dict[str, Any]:
    """The `lease` event of `session_id` with `status`, from the daemon's event stream
    (its history first), within 10 s."""
    deadline = time.monotonic() + 10
    with httpx.stream("GET", f"{d.url}/gpu/events", params={"kind": "lease", "after": "0"},
                      timeout=httpx.Timeout(10, read=2), trust_env=False) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                data = json.loads(line[5:])
                if data.get("session_id") == session_id and data.get("status") == status:
                    return dict(data)
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"no lease event {status} for {session_id} within 10 s")


def leases(fleet: FleetHosts, host: str) -> list[dict[str, Any]]:
    return list(fleet.daemons[host].status()["leases"])


def start(fleet: FleetHosts, host: str, *services: str) -> None:
    for name in services:
        r = fleet.daemons[host].post(f"/gpu/service/{name}/start")
        assert r.status_code == 200, r.text


def test_status_shows_every_host(clean: FleetHosts) -> None:
    body = clean.daemons["b"].get("/fleet/status").json()
    assert body["host"] == "b" and body["membership"]["ok"]
    hosts = {h["host"]: h for h in body["hosts"]}
    assert set(hosts) == set(SIZES)
    for name, h in hosts.items():
        assert h["reachable"] and h["ray_alive"], h
        assert h["url"] == clean.daemons[name].url
        assert h["node_id"] == clean.node_id(name)
        assert h["vram"]["total_mb"] == SIZES[name]
    assert "big" in hosts["a"]["services"] and "big" not in hosts["c"]["services"]


async def test_leases_go_to_the_best_fit(clean: FleetHosts) -> None:
    first = GPUClient(clean.daemons["a"].url, fleet=True, vram_mb=6000, ttl_s=30)
    second = GPUClient(clean.daemons["a"].url, fleet=True, vram_mb=6000, ttl_s=30)
    try:
        assert (await first.request_gpu("embedder")).acquired
        assert (await second.request_gpu("embedder")).acquired
        # 6000 MB: c (7168) leaves the least room; with c taken, b (15360) before a (23552)
        assert (first.host, first.host_url) == ("c", clean.daemons["c"].url)
        assert second.host == "b"
        assert [x["vram_mb"] for x in leases(clean, "c")] == [6000]
        assert [x["vram_mb"] for x in leases(clean, "b")] == [6000]
        assert leases(clean, "a") == []
        assert await first.release_gpu() and await second.release_gpu()  # at their hosts
        assert leases(clean, "c") == [] and leases(clean, "b") == []
    finally:
        await first.close()
        await second.close()


def test_a_phase_goes_where_it_needs_no_preemption(clean: FleetHosts) -> None:
    start(clean, "b", "big")  # b: 3360 MB free; tts beside big needs big gone
    start(clean, "c", "small")  # c: 4168 MB free; tts fits beside small
    a = clean.daemons["a"]
    dry = a.post("/fleet/prepare-phase/9", params={"dry_run": "true"}).json()
    options = {o["host"]: o for o in dry["placement"]["options"]}
    assert options["b"]["preempts"] == [{"service": "big", "priority": 50}]
    assert options["a"]["preempts"] == [] and options["c"]["preempts"] == []
    assert dry["host"] == "c"  # no preemption, and the least room left (168 MB)
    r = a.post("/fleet/prepare-phase/9")
    assert r.status_code == 200, r.text
    assert r.json()["host"] == "c" and r.json()["result"]["phase"] == 9
    assert clean.daemons["c"].states()["tts"] == "ready"
    assert clean.daemons["c"].states()["small"] == "ready"  # kept: it fits beside tts
    assert clean.daemons["b"].states()["big"] == "ready"  # b was not touched


def test_without_room_anywhere_the_cheapest_preemption_wins(clean: FleetHosts) -> None:
    start(clean, "a", "big", "small", "tts")  # 4552 free: small (20) must go
    start(clean, "b", "big")  # 3360 free: big (50) must go
    start(clean, "c", "tts")  # 3168 free: tts (60) must go
    r = clean.daemons["b"].post("/fleet/acquire", params={"dry_run": "true"}, json={
        "session_id": "s1", "requester": "trainer", "vram_mb": 7000})
    assert r.status_code == 200, r.text
    body = r.json()
    preempts = {o["host"]: o["preempts"] for o in body["placement"]["options"]}
    assert preempts == {"a": [{"service": "small", "priority": 20}],
                        "b": [{"service": "big", "priority": 50}],
                        "c": [{"service": "tts", "priority": 60}]}
    assert body["host"] == "a"
    # a dry run acts nowhere
    assert all(d.states()[n] == "ready" for d, n in (
        (clean.daemons["a"], "small"), (clean.daemons["b"], "big"), (clean.daemons["c"], "tts")))


def test_a_refusal_names_every_host(clean: FleetHosts) -> None:
    r = clean.daemons["c"].post("/fleet/acquire", json={
        "session_id": "huge", "requester": "t", "vram_mb": 30000, "timeout_ms": 1000})
    assert r.status_code == 409
    body = r.json()
    assert body["error"] == "insufficient_vram"
    assert {h["host"]: h["error"] for h in body["hosts"]} == {
        "a": "insufficient_vram", "b": "insufficient_vram", "c": "insufficient_vram"}
    assert "a: " in body["detail"] and "b: " in body["detail"] and "c: " in body["detail"]
    # a service no host declares: 404, each host's own answer listed
    r = clean.daemons["a"].post("/fleet/service/nowhere/start")
    assert r.status_code == 404 and r.json()["error"] == "unknown_service"
    assert [h["host"] for h in r.json()["hosts"]] == ["a", "b", "c"]
    # `big` is declared on a and b only: never started on c, however empty c is
    r = clean.daemons["c"].post("/fleet/service/big/start", params={"dry_run": "true"})
    refused = {h["host"]: h["error"] for h in r.json()["placement"]["refused"]}
    assert r.json()["host"] == "b" and refused == {"c": "unknown_service"}


async def test_a_stale_plan_is_refused_at_once_and_placed_again(clean: FleetHosts) -> None:
    """Between the dry runs and the act, someone else takes the chosen host's room. That host
    could still grant the lease by preempting `small`; it refuses instead (the act allows
    the preemptions its dry run promised: none), at once (it waits for room only at the
    last place), and the lease is placed on the next best host, `small` untouched."""
    from gpu_manager.config.fleet import FleetConfig
    from gpu_manager.fleet.members import Host, RayMembership
    from gpu_manager.fleet.peers import Peers, Reply
    from gpu_manager.fleet.runner import Fleet, Target

    start(clean, "c", "small")  # c: 4168 MB free, so 2000 fits there best, without preempting
    c = clean.daemons["c"]
    taken: list[str] = []

    class Racing(Peers):
        async def call(self, host: Host, method: str, path: str, **kw: Any) -> Reply:
            if path == "/gpu/acquire" and not taken:  # the act, once: c's room goes first
                taken.append(host.name)
                async with httpx.AsyncClient(base_url=c.url, trust_env=False) as http:
                    r = await http.post("/gpu/acquire", json={
                        "session_id": "thief", "requester": "other", "vram_mb": 3000})
                    assert r.status_code == 200, r.text  # c: 1168 MB free now
            return await super().call(host, method, path, **kw)

    cfg = FleetConfig(address=clean.cluster.address, host="a", membership_ttl_s=0)
    fleet = Fleet(cfg, RayMembership(cfg.address, 3.0, 0.0), Racing(None, 5.0))
    lease = {"session_id": "mine", "requester": "trainer", "vram_mb": 2000}
    t0 = time.monotonic()
    try:
        placed = await fleet.place(Target(
            "a lease of 2000 MB", "/gpu/acquire/plan", "/gpu/acquire",
            plan_body={"vram_mb": 2000}, act_body=lease, lease=True, deadline=t0 + 20))
    finally:
        await fleet.aclose()
    took = time.monotonic() - t0
    assert taken == ["c"]
    [attempt] = placed.attempts
    assert (attempt.host, attempt.error) == ("c", "not_granted")
    assert "would now preempt small" in attempt.detail  # c's own words
    assert placed.host.name == "b" and placed.reply is not None and placed.reply.ok
    assert took < 10, took  # refused at once, not after the 20 s it could have waited
    assert [x["session_id"] for x in leases(clean, "b")] == ["mine"]
    assert [x["session_id"] for x in leases(clean, "c")] == ["thief"]
    assert c.states()["small"] == "ready"


def test_a_ray_task_runs_where_the_vram_is_holding_a_lease(clean: FleetHosts) -> None:
    import ray

    from gpu_manager.fleet import remote

    c_url = clean.daemons["c"].url

    @remote(vram_mb=6000, fleet=clean.daemons["a"].url)
    def where() -> tuple[str, list[Any]]:
        held = httpx.get(f"{c_url}/gpu/status", trust_env=False).json()["leases"]
        return ray.get_runtime_context().get_node_id(), held

    node, held = ray.get(where.remote(), timeout=90)
    assert node == clean.node_id("c")
    assert [(x["requester"], x["vram_mb"]) for x in held] == [("ray:where", 6000)]
    wait_for(lambda: leases(clean, "c") == [], 10, "the task's lease released in finally")


def test_a_ray_actor_holds_its_lease_until_it_dies(clean: FleetHosts) -> None:
    import ray

    from gpu_manager.fleet import remote

    @remote(vram_mb=10000, fleet=clean.daemons["a"].url, ttl_s=120)
    class Worker:
        def node(self) -> str:
            return str(ray.get_runtime_context().get_node_id())

    actor = Worker.remote()
    assert ray.get(actor.node.remote(), timeout=60) == clean.node_id("b")  # 10000: b
    [held] = leases(clean, "b")
    assert held["requester"] == "ray:Worker"
    ray.kill(actor)
    # its TTL is 120 s: what takes the lease back within seconds is its process's exit
    wait_for(lambda: leases(clean, "b") == [], 15, "the dead actor's lease reclaimed")
    event = lease_event(clean.daemons["b"], held["session_id"], "holder_exited")
    assert event["requester"] == "ray:Worker"


class _Placements(BaseHTTPRequestHandler):
    """In front of a fleet daemon for the Ray tasks' placing: passes every request on, and
    records each placement it answered (the host chosen, the hosts left out)."""

    target = ""
    seen: ClassVar[list[tuple[str, list[str]]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        r = httpx.post(self.target + self.path, content=body, trust_env=False, timeout=30,
                       headers={"Content-Type": "application/json"})
        if r.status_code == 200:
            type(self).seen.append((r.json()["host"], json.loads(body)["exclude"]))
        self.send_response(r.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, *args: Any) -> None:
        pass


def _wait_for_file(path: str) -> None:
    deadline = time.monotonic() + 60
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_ray_task_whose_host_went_full_is_placed_again(clean: FleetHosts,
                                                          tmp_path: Path) -> None:
    """The task is placed on c; while it waits for c's one CPU, someone takes c's room. Its
    lease is refused at c (at once: the placement allowed no preemption and this was not
    its last place), and the task is placed again without c and runs on b."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from gpu_manager.fleet import remote

    _Placements.target, _Placements.seen = clean.daemons["a"].url, []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _Placements)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    go = tmp_path / "go"
    try:
        blocker = ray.remote(num_cpus=1)(_wait_for_file).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(clean.node_id("c"), soft=False)
        ).remote(str(go))

        @remote(vram_mb=6000, fleet=f"http://127.0.0.1:{proxy.server_port}")
        def where() -> str:
            return str(ray.get_runtime_context().get_node_id())

        ref = where.remote()
        wait_for(lambda: _Placements.seen, 30, "the task placed")
        assert _Placements.seen == [("c", [])]
        r = clean.daemons["c"].post("/gpu/acquire", json={
            "session_id": "thief", "requester": "other", "vram_mb": 6000})
        assert r.status_code == 200, r.text
        go.touch()  # c's CPU free: the task runs there, and its lease is refused
        assert ray.get(ref, timeout=60) == clean.node_id("b")
        assert _Placements.seen == [("c", []), ("b", ["c"])]
        ray.get(blocker, timeout=30)
    finally:
        go.touch()
        proxy.shutdown()
        proxy.server_close()
    assert [x["session_id"] for x in leases(clean, "c")] == ["thief"]
    wait_for(lambda: leases(clean, "b") == [], 10, "the task's lease released on b")


def _job(flags: str, block_on: str) -> str:
    import ray

    node = str(ray.get_runtime_context().get_node_id())
    Path(flags, f"started-{node}").touch()
    deadline = time.monotonic() + 60
    while node == block_on and time.monotonic() < deadline:  # its node dies meanwhile
        time.sleep(0.05)
    return node


def test_a_host_lost_mid_task(clean: FleetHosts, tmp_path: Path) -> None:
    """c's node is removed while a task runs there holding a lease on c's daemon: the task
    is placed again and finishes elsewhere, c's daemon takes the lease back (its holder's
    process died with the node), and the fleet view marks c down within Ray's health-check
    period (1 s here)."""
    import ray

    from gpu_manager.fleet import remote

    job = remote(vram_mb=6000, fleet=clean.daemons["a"].url)(_job)
    c_node = clean.node_id("c")
    ref = job.remote(str(tmp_path), c_node)
    wait_for((tmp_path / f"started-{c_node}").exists, 60, "the task running on c")
    assert [x["requester"] for x in leases(clean, "c")] == ["ray:_job"]
    t0 = time.monotonic()
    clean.remove("c")
    node = ray.get(ref, timeout=120)
    took = time.monotonic() - t0
    assert node in (clean.node_id("a"), clean.node_id("b")), node
    assert took < 60, took
    wait_for(lambda: leases(clean, "c") == [], 15, "c's daemon reclaiming the dead task's lease")

    def c_down() -> bool:
        hosts = {h["host"]: h for h in clean.daemons["a"].get("/fleet/status").json()["hosts"]}
        return not hosts["c"]["ray_alive"] and not hosts["c"]["reachable"]

    wait_for(c_down, 10, "the fleet view marking c down")
    # nothing is placed on c any more, even where it would fit best
    r = clean.daemons["a"].post("/fleet/acquire", params={"dry_run": "true"}, json={
        "session_id": "after", "requester": "t", "vram_mb": 6000})
    assert r.json()["host"] == "b"
    assert {h["host"]: h["error"] for h in r.json()["placement"]["refused"]} == {
        "c": "host_down"}
    see_the_fleet_on_the_dashboard(clean, {"a": "true", "b": "true", "c": "false"})


def see_the_fleet_on_the_dashboard(fleet: FleetHosts, reachable: dict[str, str]) -> None:
    """The page of a daemon (a real Chromium) shows one row per host, each reachable or
    not as `reachable` says."""
    from playwright.sync_api import expect, sync_playwright

    from tests.test_web import CHROMIUM_ARGS, chromium_path

    exe = chromium_path()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(fleet.daemons["b"].url + "/")
            expect(page.locator("#fleet")).to_be_visible(timeout=15_000)
            expect(page.locator("tr.fleet-host")).to_have_count(len(reachable))
            for host, up in reachable.items():
                row = page.locator(f"tr.fleet-host[data-host='{host}']")
                expect(row).to_have_attribute("data-reachable", up, timeout=15_000)
            assert errors == []
        finally:
            browser.close()

