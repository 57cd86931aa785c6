"""More of the daemon end to end: legacy lock holders, a lock lost mid-transition, a Docker
service in a phase, the token, non-loopback binding, metrics and server-sent events."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.daemon import SLOW_COSYVOICE, DaemonProc, preempt_in_background
from tests.support.env import RedisServer, free_port, wait_for


@pytest.fixture
def redis_daemon(tmp_path: Path, redis_server: RedisServer) -> Iterator[DaemonProc]:
    redis.Redis.from_url(redis_server.url).flushdb()
    # cosyvoice takes 1.5 s to shut down, leaving time to steal the lock mid-transition
    d = DaemonProc(tmp_path, redis_url=redis_server.url, replace=SLOW_COSYVOICE)
    d.start()
    yield d
    redis.Redis.from_url(redis_server.url).delete("gpu_mutex")
    d.close()


@pytest.mark.redis
def test_legacy_holder_gets_423_and_is_shown(redis_daemon: DaemonProc,
                                            redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.set("gpu_mutex", "legacy-worker", ex=60)
    resp = redis_daemon.post("/gpu/prepare-phase/2")
    assert resp.status_code == 423
    body = resp.json()
    assert body["error"] == "lock_held" and body["holder"] == "legacy-worker"
    assert 55 < body["ttl"] <= 60
    wait_for(lambda: redis_daemon.status()["lock"]["holder"] == "legacy-worker", 3,
             "status to show the legacy holder")
    assert redis_daemon.status()["lock"]["held_for"] == {
        "kind": "legacy", "operations": [], "leases": [], "legacy": "legacy-worker"}
    assert redis_daemon.states()["vidi"] == "stopped"
    r.delete("gpu_mutex")
    assert redis_daemon.post("/gpu/prepare-phase/2").status_code == 200
    # while the daemon transitions, legacy code sees the daemon as the holder
    seen: list[str | None] = []
    t = threading.Thread(target=lambda: redis_daemon.post("/gpu/prepare-phase/3"))
    t.start()
    while t.is_alive():
        seen.append(r.get("gpu_mutex"))
        time.sleep(0.01)
    t.join()
    assert any(h and h.startswith("gpu-manager:PreparePhase:3:") for h in seen)
    assert r.get("gpu_mutex") is None  # released at the end of the transition


@pytest.mark.redis
def test_lock_lost_mid_transition_aborts_before_the_start(
    redis_daemon: DaemonProc, redis_server: RedisServer
) -> None:
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    t, result = preempt_in_background(redis_daemon)
    # an operator force-releases and a legacy worker grabs the GPU while we are stopping
    r.delete("gpu_mutex")
    r.set("gpu_mutex", "intruder", ex=60)
    t.join(30)
    resp = result["r"]
    assert resp.status_code == 503 and resp.json()["error"] == "lock_lost"
    steps = resp.json()["operation"]["steps"]
    assert [(s["action"], s["status"]) for s in steps] == [("stop", "done"), ("start", "failed")]
    assert redis_daemon.states()["comfyui"] == "stopped"  # never started under a lost lock
    assert r.get("gpu_mutex") == "intruder"  # and the intruder's lock was not released


@pytest.mark.docker
def test_docker_service_in_a_phase(tmp_path: Path, busybox_image: str,
                                   docker_client: Any) -> None:
    port = free_port()
    name = f"gmt-e2e-{uuid.uuid4().hex[:8]}"
    script = (f"mkdir -p /tmp/www && echo ok > /tmp/www/health && "
              f"exec httpd -f -p 127.0.0.1:{port} -h /tmp/www")
    extra = f"""
  webbox:
    type: docker
    container: {name}
    image: {busybox_image}
    command: ["sh", "-c", "{script}"]
    network_mode: host
    vram_mb: 2000
    priority: 30
    stop_timeout_s: 2
    health: {{url: "http://127.0.0.1:{port}/health", interval_s: 1}}
"""
    d = DaemonProc(tmp_path, extra_services=extra,
                   extra_phases="  6:\n    name: docker\n    services: [webbox]\n").start()
    try:
        r6 = d.post("/gpu/prepare-phase/6")
        assert r6.status_code == 200, r6.text
        assert d.states()["webbox"] == "ready"
        assert docker_client.containers.get(name).status == "running"
        assert d.status()["services"]["webbox"]["type"] == "docker"
        r2 = d.post("/gpu/prepare-phase/2")
        assert [(s["action"], s["service"]) for s in r2.json()["plan"]["steps"]] == [
            ("stop", "webbox"), ("start", "vidi")]
        assert docker_client.containers.get(name).status == "exited"
    finally:
        d.close()
        docker_client.containers.get(name).remove(force=True)


def test_token_guards_mutations_only(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, token="s3cret").start()
    try:
        anon = httpx.post(f"{d.url}/gpu/prepare-phase/1", trust_env=False)
        assert anon.status_code == 401 and anon.json()["error"] == "unauthorized"
        wrong = httpx.post(f"{d.url}/gpu/prepare-phase/1", trust_env=False,
                           headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert httpx.get(f"{d.url}/gpu/status", trust_env=False).status_code == 200
        assert d.post("/gpu/prepare-phase/1").status_code == 200  # carries the token
        assert "s3cret" not in d.log_text()
    finally:
        d.close()


def test_non_loopback_bind_needs_a_token(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("gpu-manager")
    res = subprocess.run([str(exe), "serve", "--host", "0.0.0.0", "--port", str(free_port()),
                          "--state-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=60, check=False,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 2
    assert "refusing to bind 0.0.0.0" in res.stderr and "GPU_MANAGER_TOKEN" in res.stderr


def test_metrics_and_events(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path).start()
    events: list[dict[str, Any]] = []
    connected = threading.Event()

    def listen() -> None:
        with httpx.stream("GET", f"{d.url}/gpu/events", timeout=30, trust_env=False) as resp:
            for line in resp.iter_lines():
                if line.startswith(": connected"):
                    connected.set()
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1].get("service") == "vidi" and events[-1].get("state") == "ready":
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        assert connected.wait(10), "the event stream did not open"
        assert d.post("/gpu/prepare-phase/2").status_code == 200
        t.join(10)
        kinds = [(e["kind"], e.get("service"), e.get("state") or e.get("status"))
                 for e in events]
        assert ("state", "vidi", "starting") in kinds and ("state", "vidi", "ready") in kinds
        assert any(k == "step" for k, _, _ in kinds)
        text = d.get("/metrics").text
        assert 'gpu_manager_service_state{service="vidi",state="ready"} 1.0' in text
        assert 'gpu_manager_vram_used_bytes{device="0"} 4.194304e+09' in text
        assert ('gpu_manager_transition_duration_seconds_count{kind="PreparePhase",'
                'outcome="succeeded"} 1.0') in text
        ready = d.get("/ready").json()
        assert ready["ready"] and ready["probe"]["source"] == "simulated"
        assert d.get("/health").json()["status"] == "ok"
    finally:
        d.close()
