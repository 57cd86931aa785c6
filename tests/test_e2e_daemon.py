"""End to end over real HTTP: the daemon as a subprocess, stand-ins as real processes.

AC-1..AC-3 for both lock backends, a docker-typed service in a phase, 20 concurrent clients,
a legacy holder of gpu_mutex, and the error contract. A sampler reads the simulated GPU from
outside the daemon all along: used memory never exceeds the total and nothing hits OOM.
"""

from __future__ import annotations

import concurrent.futures
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.daemon import DaemonProc, Sampler
from tests.support.env import RedisServer, wait_for

TOTAL = 24576


@pytest.fixture(params=["memory", "redis"])
def daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DaemonProc]:
    url = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        redis.Redis.from_url(server.url).flushdb()
        url = server.url
    d = DaemonProc(tmp_path, redis_url=url).start()
    yield d
    d.close()


@pytest.fixture
def sampler(daemon: DaemonProc) -> Iterator[Sampler]:
    s = Sampler(daemon.sim_dir, TOTAL)
    yield s
    s.stop()
    assert s.samples > 10
    assert s.max_used <= TOTAL, f"simulated GPU over its total: {s.max_used} MB"
    assert s.registry.oom_events() == [], "a service hit (simulated) CUDA OOM"


def steps(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["action"], s["service"]) for s in body["plan"]["steps"]]


def running(d: DaemonProc) -> set[str]:
    return {n for n, s in d.states().items() if s in ("ready", "starting", "unhealthy")}


def test_ac1_phase_sequence(daemon: DaemonProc, sampler: Sampler) -> None:
    t0 = time.monotonic()
    r2 = daemon.post("/gpu/prepare-phase/2")
    assert r2.status_code == 200, r2.text
    assert r2.json()["success"] is True and r2.json()["phase"] == 2
    assert steps(r2.json()) == [("start", "vidi")]
    assert running(daemon) == {"vidi"}
    r3 = daemon.post("/gpu/prepare-phase/3")
    assert r3.status_code == 200, r3.text
    assert steps(r3.json()) == [("stop", "vidi"), ("start", "cosyvoice")]
    assert running(daemon) == {"cosyvoice"}
    r4 = daemon.post("/gpu/prepare-phase/4")
    assert r4.status_code == 200, r4.text
    assert steps(r4.json()) == [("stop", "cosyvoice"), ("start", "comfyui")]
    assert running(daemon) == {"comfyui"}
    elapsed = time.monotonic() - t0
    status = daemon.status()
    assert status["phase"] == 4
    assert status["vram"]["used_mb"] == 20000
    assert status["services"]["comfyui"]["measured_mb"] == 20000
    lock = status["lock"]
    backend = "redis" if daemon.env.get("GPU_MANAGER_REDIS_URL") else "memory"
    assert lock["holder"] is None and lock["backend"] == backend
    # a start waits for the VRAM of the stops it needs, and only for those: cosyvoice fits
    # beside vidi (no wait), comfyui needs cosyvoice's 4000 MB (the 500 ms release delay)
    start3, start4 = r3.json()["plan"]["steps"][1], r4.json()["plan"]["steps"][1]
    assert start3["after"] == [] and start3["reclaim_wait_s"] < 0.2
    assert start4["after"] == [0] and start4["reclaim_wait_s"] > 0.3
    assert elapsed < 30


def test_ac2_status_shape(daemon: DaemonProc) -> None:
    assert daemon.post("/gpu/prepare-phase/2").status_code == 200
    body = daemon.status()
    vram = body["vram"]
    for key in ("total_mb", "used_mb", "free_mb", "available_mb", "processes",
                "temperature_c", "utilization_percent"):
        assert key in vram, key
    assert (vram["total_mb"], vram["used_mb"], vram["free_mb"]) == (TOTAL, 4000, TOTAL - 4000)
    assert vram["available_mb"] == TOTAL - 4000 - 1024
    (proc,) = vram["processes"]
    assert set(proc) >= {"pid", "name", "memory_mb"}
    assert (proc["memory_mb"], proc["service"]) == (4000, "vidi")
    assert vram["source"] == "simulated"
    svc = body["services"]
    assert set(svc) == {"comfyui", "cosyvoice", "vidi", "ollama"}
    assert {k: svc["vidi"][k] for k in ("state", "vram_mb", "priority", "phases")} == {
        "state": "ready", "vram_mb": 4000, "priority": 40, "phases": [2]}
    assert svc["ollama"]["phases"] == [] and svc["ollama"]["state"] == "stopped"
    assert set(body["lock"]) >= {"holder", "ttl"}


def test_ac3_start_preempts_and_waits_for_vram(daemon: DaemonProc, sampler: Sampler) -> None:
    assert daemon.post("/gpu/service/cosyvoice/start").status_code == 200
    r = daemon.post("/gpu/service/comfyui/start")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["service"] == "comfyui"
    assert steps(body) == [("stop", "cosyvoice"), ("start", "comfyui")]
    stop, start = body["plan"]["steps"]
    assert stop["preemption"] and stop["reason"] == "preempted by comfyui (priority 50 < 100)"
    assert running(daemon) == {"comfyui"}
    # evidence from the GPU's side: comfyui claimed memory only once cosyvoice's was released
    (cosy,) = sampler.by_name("cosyvoice")
    wait_for(lambda: sampler.by_name("comfyui"), 5, "the sampler to see comfyui")
    (comfy,) = sampler.by_name("comfyui")
    assert cosy.dead_since is not None and comfy.registered_at is not None
    assert comfy.registered_at >= cosy.dead_since + 0.5 - 0.01
    assert start["reclaim_wait_s"] >= 0.3


def test_concurrent_clients_leave_a_consistent_state(
    daemon: DaemonProc, sampler: Sampler
) -> None:
    rng = random.Random(7)
    wanted = [rng.choice([1, 2, 3, 4, 5]) for _ in range(20)]

    def ask(phase: int) -> int:
        return daemon.post(f"/gpu/prepare-phase/{phase}").status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(ask, wanted))
    assert codes == [200] * 20
    status = daemon.status()
    phase = status["phase"]
    expected = {1: set(), 2: {"vidi"}, 3: {"cosyvoice"}, 4: {"comfyui"}, 5: set()}[phase]
    assert running(daemon) == expected
    assert status["operations"] == []
    held = 4000 * bool(expected & {"vidi", "cosyvoice"}) + 20000 * ("comfyui" in expected)
    # a service the last phase stopped may still be in the driver's release delay
    wait_for(lambda: daemon.status()["vram"]["used_mb"] == held, 5, f"{held} MB in use")


def test_dry_run_wait_false_and_operations(daemon: DaemonProc) -> None:
    dry = daemon.post("/gpu/prepare-phase/4", params={"dry_run": "true"})
    assert dry.status_code == 200 and dry.json()["dry_run"] is True
    assert [s["service"] for s in dry.json()["plan"]["steps"]] == ["comfyui"]
    assert running(daemon) == set()
    accepted = daemon.post("/gpu/prepare-phase/2", params={"wait": "false"})
    assert accepted.status_code == 202
    op_id = accepted.json()["operation_id"]

    def done() -> bool:
        return daemon.get(f"/gpu/operations/{op_id}").json()["status"] == "succeeded"

    wait_for(done, 20, "the background operation")
    op = daemon.get(f"/gpu/operations/{op_id}").json()
    assert op["steps"][0]["status"] == "done" and op["steps"][0]["duration_s"] > 0
    assert daemon.get("/gpu/operations/nope").status_code == 404


def test_error_contract(daemon: DaemonProc) -> None:
    unknown = daemon.post("/gpu/service/nope/start")
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "unknown_service"
    assert "known: comfyui, cosyvoice, ollama, vidi" in unknown.json()["detail"]
    assert daemon.post("/gpu/prepare-phase/9").json()["error"] == "unknown_phase"
    bad = daemon.post("/gpu/prepare-phase/abc")
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
    assert daemon.post("/gpu/service/comfyui/start").status_code == 200
    blocked = daemon.post("/gpu/service/cosyvoice/start")
    assert blocked.status_code == 409
    body = blocked.json()
    assert body["error"] == "insufficient_vram" and body["short_mb"] == 448
    assert body["blockers"] == [{"name": "comfyui", "mb": 20000,
                                 "reason": "priority 100 >= 50"}]
    assert daemon.post("/gpu/prepare-phase/4").status_code == 200
    guarded = daemon.post("/gpu/service/comfyui/stop")
    assert guarded.status_code == 409 and guarded.json()["error"] == "needed_by_phase"
    forced = daemon.post("/gpu/service/comfyui/stop", params={"force": "true"})
    assert forced.status_code == 200 and running(daemon) == set()
    released = daemon.post("/gpu/release-all").json()
    assert released == {**released, "success": True, "message": "nothing was running"}
    assert daemon.get("/nope").json()["error"] == "not_found"
