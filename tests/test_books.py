"""The books never lie, against real daemons, real processes and a real redis-server: one
daemon per state directory, the GPU lock owned through a Redis restart and a stolen key,
a lease's memory counted once, a daemon killed during a sleep or wake call, records swapped
or damaged in the state file, SIGTERM with a start hung in its health checks, and the
request bounds (size, coalescing, names that are no service)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from gpu_manager.client import GPUClient, GPULeaseLost
from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import DaemonProc
from tests.support.env import RedisServer, free_port, until, wait_for
from tests.test_sleep import sleeper


def record(d: DaemonProc, name: str) -> dict[str, Any]:
    units: dict[str, Any] = json.loads((d.state_dir / "state.json").read_text())["units"]
    return units.get(name) or {}


def pids(d: DaemonProc, name: str) -> list[int]:
    found: list[int] = d.status()["services"][name]["pids"]
    return found


# -- one daemon per state directory ---------------------------------------------------------
def test_a_second_daemon_on_the_same_state_dir_exits_and_touches_nothing(
        tmp_path: Path) -> None:
    # on_shutdown: stop is what made the second one stop the first one's services
    d = DaemonProc(tmp_path, env={"GPU_MANAGER_ON_SHUTDOWN": "stop"}).start()
    try:
        assert d.post("/gpu/service/vidi/start").status_code == 200
        before = pids(d, "vidi")
        assert d.proc is not None
        exe = Path(sys.executable).with_name("gpu-manager")
        t0 = time.monotonic()
        second = subprocess.run([str(exe), "serve"], env=d.env, capture_output=True,
                                text=True, timeout=30, check=False)
        took = time.monotonic() - t0
        assert second.returncode != 0, second.stderr
        assert str(d.state_dir.resolve()) in second.stderr
        assert f"pid {d.proc.pid}" in second.stderr, second.stderr
        assert took < 10, f"the second instance took {took:.1f}s to give up"
        assert d.states()["vidi"] == "ready" and pids(d, "vidi") == before
        assert all(psutil.pid_exists(p) for p in before)
    finally:
        d.close()


# -- the GPU lock, owned through loss ---------------------------------------------------------
@pytest.mark.redis
def test_a_redis_restart_under_a_lease_the_daemon_takes_the_key_back(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")  # our own: restarted below, no persistence
    d = DaemonProc(tmp_path, redis_url=server.url).start()
    try:
        granted = d.post("/gpu/acquire", json={"session_id": "job", "requester": "ml",
                                               "vram_mb": 2000, "ttl_s": 60})
        assert granted.status_code == 200, granted.text
        r = redis.Redis.from_url(server.url, decode_responses=True)
        assert str(r.get("gpu_mutex")).startswith("gpu-manager:")
        server.stop()
        server = RedisServer(tmp_path / "redis", port=server.port)  # empty: the key is gone
        r = redis.Redis.from_url(server.url, decode_responses=True)
        wait_for(lambda: str(r.get("gpu_mutex")).startswith("gpu-manager:"), 10,
                 "the daemon to take the key back")
        # a legacy worker's SET NX now fails: one user of the GPU, not two
        assert not r.set("gpu_mutex", "legacy-worker", nx=True, ex=60)
        assert d.post("/gpu/renew", json={"session_id": "job"}).status_code == 200
        wait_for(lambda: d.status()["lock"]["held_for"]["kind"] == "leases", 5, "status")
        metrics = d.get("/metrics").text
        assert 'gpu_manager_lock_losses_total{outcome="retaken"} 1.0' in metrics
    finally:
        d.close()
        server.stop()


@pytest.mark.redis
async def test_a_stolen_key_loses_the_lease_and_the_client_hears_it(
        tmp_path: Path, redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.flushdb()
    d = DaemonProc(tmp_path, redis_url=redis_server.url).start()
    lost: list[str] = []
    client = GPUClient(d.url, vram_mb=2000, ttl_s=1.5, on_lost=lost.append)
    try:
        assert (await client.request_gpu("ctgan")).acquired
        session = client.current_task_id
        r.set("gpu_mutex", "legacy-worker", ex=60)  # taken over under the daemon's feet
        await until(lambda: lost, 10, "the client to hear its lease was lost")
        assert "legacy-worker" in lost[0] and client.lost == lost[0]
        assert not client.is_acquired
        with pytest.raises(GPULeaseLost):
            client.raise_if_lost()
        renew = d.post("/gpu/renew", json={"session_id": session})
        assert renew.status_code == 409 and renew.json()["lost"] is True
        status = d.status()
        assert status["leases"] == []
        assert status["lock"]["held_for"]["kind"] == "legacy"
        assert status["lock"]["held_for"]["legacy"] == "legacy-worker"
        assert r.get("gpu_mutex") == "legacy-worker"  # never deleted nor taken over by us
        assert 'gpu_manager_lock_losses_total{outcome="revoked"} 1.0' in d.get("/metrics").text
    finally:
        await client.close()
        r.delete("gpu_mutex")
        d.close()


# -- a lease's memory, counted once -----------------------------------------------------------
@pytest.mark.parametrize("with_pid", [True, False], ids=["pid", "no-pid"])
def test_a_lease_in_use_is_counted_once(tmp_path: Path, with_pid: bool) -> None:
    d = DaemonProc(tmp_path).start()
    # the client: a process that holds 10000 MB on the simulated GPU, as a training job
    client = subprocess.Popen(
        [sys.executable, "-m", "gpu_manager.sim.workload", "--name", "client",
         "--vram-mb", "10000", "--port", str(free_port())],
        env={**d.env, "GPU_MANAGER_SIM_DIR": str(d.sim_dir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: any(x.pid == client.pid for x in SimRegistry(d.sim_dir).active()),
                 10, "the client's allocation")
        body: dict[str, Any] = {"session_id": "train", "requester": "ml", "vram_mb": 10000,
                                "ttl_s": 60}
        if with_pid:
            body["pid"] = client.pid
        assert d.post("/gpu/acquire", json=body).status_code == 200
        # 23552 MB budget: 10000 in use by the lease, 13552 left. Counted twice (its claim
        # and its memory as foreign), 4000 more did not fit.
        assert d.post("/gpu/service/vidi/start").status_code == 200
        assert d.post("/gpu/service/cosyvoice/start").status_code == 200
        vram = d.status()["vram"]
        assert vram["foreign_mb"] == 0
        owner = {p["pid"]: p["service"] for p in vram["processes"]}
        assert owner[client.pid] == ("lease:train" if with_pid else None)
    finally:
        client.kill()
        client.wait(10)
        d.close()


# -- a daemon killed during a sleep or wake call ----------------------------------------------
def asleep_says(port: int) -> bool:
    answer: bool = httpx.get(f"http://127.0.0.1:{port}/is_sleeping",
                             trust_env=False).json()["is_sleeping"]
    return answer


# The awaits of a sleep and a wake a daemon can die in: during the service's sleep call;
# after it answered, while the GPU is watched for the memory to go (here it never goes: the
# server says it sleeps and keeps its memory); during the wake call.
SLOW = {"sleep": ', "--sleep-s", "1.5"',
        "confirmation": ', "--sleep-keeps-memory"',
        "wake": ', "--wake-s", "1.5"'}


@pytest.mark.parametrize("during", sorted(SLOW))
def test_a_daemon_killed_during_a_sleep_or_wake_adopts_what_really_is(
        tmp_path: Path, during: str) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=sleeper("vllm", port, SLOW[during])).start()
    try:
        assert d.post("/gpu/service/sleeper/start").status_code == 200
        if during == "wake":
            assert d.post("/gpu/service/sleeper/sleep").status_code == 200
        before = pids(d, "sleeper")
        verb = "start" if during == "wake" else "sleep"
        call = threading.Thread(target=lambda: _quietly(d, f"/gpu/service/sleeper/{verb}"))
        call.start()
        if during == "confirmation":  # the call answered: the record says asleep
            wait_for(lambda: record(d, "sleeper").get("asleep") is True, 5, "the answer")
        else:  # the intent is on disk before the call is made
            wait_for(lambda: record(d, "sleeper").get("intent") == during, 5, "the intent")
        time.sleep(0.3)  # inside the 1.5 s call, or the 5 s wait for the memory to go
        d.kill(signal.SIGKILL)
        call.join(30)
        # the server finishes the call on its own
        wait_for(lambda: asleep_says(port) == (during != "wake"), 10, "the call to end")
        d.start()
        # what is true: asleep after a sleep; awake after a wake, and after a "sleep" that
        # kept its memory (the GPU shows it: it is serving, counted whole)
        state = "sleeping" if during == "sleep" else "ready"
        wait_for(lambda: d.states()["sleeper"] == state, 15, f"the sleeper adopted {state}")
        assert pids(d, "sleeper") == before  # adopted, not restarted
        started = d.post("/gpu/service/sleeper/start")
        assert started.status_code == 200, started.text
        actions = [s["action"] for s in started.json()["plan"]["steps"]]
        assert actions == (["wake"] if during == "sleep" else [])
        assert d.states()["sleeper"] == "ready"
        if during != "confirmation":
            assert not asleep_says(port)
    finally:
        d.close()


def _quietly(d: DaemonProc, path: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        d.post(path)


# -- the state file: records that disagree, shapes that are not its own -----------------------
def test_swapped_records_are_dropped_and_each_process_adopted_on_its_own_proof(
        tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()
    try:
        assert d.post("/gpu/service/vidi/start").status_code == 200
        assert d.post("/gpu/service/cosyvoice/start").status_code == 200
        before = {n: pids(d, n) for n in ("vidi", "cosyvoice")}
        d.kill(signal.SIGKILL)
        path = d.state_dir / "state.json"
        state = json.loads(path.read_text())
        units = state["units"]
        units["vidi"], units["cosyvoice"] = units["cosyvoice"], units["vidi"]
        path.write_text(json.dumps(state))
        d.start()
        wait_for(lambda: d.states()["vidi"] == d.states()["cosyvoice"] == "ready", 15,
                 "both adopted")
        assert {n: pids(d, n) for n in before} == before  # each its own process
        assert all(psutil.pid_exists(p) for ps in before.values() for p in ps)  # none killed
        assert "the record is dropped" in d.log_text()
    finally:
        d.close()


SHAPES = {
    "a list": "[]",
    "units a list": '{"units": []}',
    "bad records": '{"units": {"vidi": 5, "cosyvoice": {"kind": "native", "pid": "x"}}, '
                   '"operations": {"o1": {"id": "o1", "request": {"kind": "PreparePhase", '
                   '"phase": "zz"}}}}',
    "operations not records": '{"operations": {"id": 7}, "phase": "3"}',
    "not JSON": "{units: ",
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_state_file_of_any_shape_loads_what_is_valid_and_reports_the_rest(
        tmp_path: Path, shape: str) -> None:
    d = DaemonProc(tmp_path).start()
    try:
        assert d.post("/gpu/service/vidi/start").status_code == 200
        before = pids(d, "vidi")
        d.kill(signal.SIGKILL)
        (d.state_dir / "state.json").write_text(SHAPES[shape])
        d.start()  # it starts (it used to crash at start-up, leaving vidi unmanaged)
        wait_for(lambda: d.states()["vidi"] == "ready", 15, "vidi found and adopted")
        assert pids(d, "vidi") == before
        ready = d.get("/ready").json()
        assert ready["state"]["problems"], ready
        assert list(d.state_dir.glob("state.json.damaged-*"))  # nothing lost
    finally:
        d.close()


# -- SIGTERM with a start hung in its health checks -------------------------------------------
HUNG = """
  hung:
    type: native
    vram_mb: 1000
    priority: 60
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "hung", "--vram-mb",
              "1000", "--port", "{port}", "--startup-s", "3600"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 1, interval_s: 5}}
    start_timeout_s: 120
    stop_timeout_s: 2
"""


def test_sigterm_with_a_hung_start_exits_within_its_budget_and_answers_json(
        tmp_path: Path) -> None:
    budget = 6.0
    d = DaemonProc(tmp_path, extra_services=HUNG.format(port=free_port()),
                   env={"GPU_MANAGER_SHUTDOWN_TIMEOUT_S": str(budget)}).start()
    result: dict[str, httpx.Response] = {}
    try:
        waiting = threading.Thread(target=lambda: result.update(
            r=d.post("/gpu/service/hung/start")))
        waiting.start()
        wait_for(lambda: d.states()["hung"] == "starting", 10, "the hung start")
        assert d.proc is not None
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(60)
        took = time.monotonic() - t0
        waiting.join(30)
        assert took <= budget + 1.5, f"exited {took:.1f}s after SIGTERM ({budget:g}s budget)"
        resp = result["r"]
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["error"] == "shutting_down"
    finally:
        d.close()


def test_native_services_get_the_child_log_settings(tmp_path: Path) -> None:
    from gpu_manager.config import load_inventory
    from gpu_manager.daemon import Daemon
    from gpu_manager.settings import Settings
    from tests.support.daemon import write_inventory

    write_inventory(tmp_path / "config")
    d = Daemon(Settings(config_dir=tmp_path / "config", state_dir=tmp_path / "state",
                        child_log_max_bytes=4096, child_log_backups=7))
    cfg = load_inventory(tmp_path / "config").services["vidi"]
    driver = d.driver("vidi", cfg)
    assert (driver.log_max_bytes, driver.log_backups) == (4096, 7)  # type: ignore[attr-defined]


# -- bounds on requests -----------------------------------------------------------------------
def test_request_bounds(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()
    try:
        huge = '{"session_id": "x", "requester": "' + "a" * (2 * 1024 * 1024) + '"}'
        resp = d.post("/gpu/acquire", content=huge,
                      headers={"Content-Type": "application/json"})
        assert resp.status_code == 413 and resp.json()["error"] == "payload_too_large"

        def chunks() -> Any:
            for _ in range(3):
                yield b"a" * (1024 * 1024)

        chunked = d.post("/gpu/acquire", content=chunks(),
                         headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413
        # a client lease's name is the planner's, never a service's
        granted = d.post("/gpu/acquire", json={"session_id": "s", "requester": "ml",
                                               "vram_mb": 1000})
        assert granted.status_code == 200
        resp = d.post("/gpu/service/lease:s/start")
        assert resp.status_code == 404 and resp.json()["error"] == "unknown_service"
        assert "known: comfyui" in resp.json()["detail"]
        # a card this daemon does not manage is a bad request, not a refusal
        resp = d.post("/gpu/acquire", json={"session_id": "t", "requester": "ml",
                                            "device": 7})
        assert resp.status_code == 422 and resp.json()["error"] == "invalid_request"
    finally:
        d.close()


def test_identical_requests_in_flight_are_one_operation(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()
    try:
        async def many() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=d.url, timeout=60, trust_env=False) as c:
                return await asyncio.gather(*(c.post("/gpu/prepare-phase/4")
                                              for _ in range(10)))

        answers = asyncio.run(many())
        assert {r.status_code for r in answers} == {200}
        ops = {r.json()["operation_id"] for r in answers}
        # the first runs, the rest join it (or run after it with nothing to do)
        assert len(ops) <= 2, ops
        assert sum(r.json()["joined"] for r in answers) >= 8
        assert d.states()["comfyui"] == "ready"
    finally:
        d.close()
