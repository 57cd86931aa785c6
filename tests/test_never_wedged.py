"""Named faults against the real daemon subprocess: it always answers in bounded time, the
GPU lock is released, and the GPU is left in a state the answer describes.

The in-process fault suite (tests/faults/) covers every await point on fakes; these are the
cases as a user meets them, with real processes, a real Docker engine and a real Redis.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.support.daemon import DaemonProc
from tests.support.env import RedisServer, free_port, wait_for


def test_health_url_the_client_rejects_fails_the_start_and_nothing_wedges(
        tmp_path: Path) -> None:
    # Passes check-config (a well-formed URL) but the HTTP client raises IDNAError, not an
    # HTTPError, at every check. Before: the start task died, the unit stayed `starting`,
    # prepare-phase never answered, the lock stayed held, SIGTERM took over a minute.
    extra = f"""
  badurl:
    type: native
    vram_mb: 1000
    priority: 5
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--vram-mb", "1000",
              "--port", "{free_port()}"]
    health: {{url: "http://xn--zz.example:8099/health", timeout_s: 0.5}}
    start_timeout_s: 1.5
"""
    d = DaemonProc(tmp_path, extra_services=extra,
                   extra_phases="  7:\n    services: [badurl]\n").start()
    try:
        t0 = time.monotonic()
        r = d.post("/gpu/prepare-phase/7")
        took = time.monotonic() - t0
        assert r.status_code == 502, r.text
        body = r.json()
        assert body["error"] == "start_failed" and body["gpu_state"]["badurl"] == "failed"
        assert "IDNAError" in body["detail"] or "cannot check" in body["detail"]
        assert took < 1.5 + 3, took
        status = d.status()
        assert status["lock"]["holder"] is None and status["operations"] == []
        assert status["services"]["badurl"]["state"] == "failed"
        assert status["services"]["badurl"]["pids"] == []
        assert d.post("/gpu/prepare-phase/2").status_code == 200  # the daemon carries on
        assert d.get("/ready").status_code == 200
    finally:
        assert d.proc is not None
        t0 = time.monotonic()
        d.kill(signal.SIGTERM)
        assert time.monotonic() - t0 < 10, "SIGTERM took too long"
        d.close()


@pytest.mark.docker
def test_docker_api_error_mid_start_is_a_502_with_the_engines_reason(
        tmp_path: Path, busybox_image: str, docker_client: Any) -> None:
    name = f"gmt-apierr-{uuid.uuid4().hex[:8]}"
    extra = f"""
  broken:
    type: docker
    container: {name}
    image: {busybox_image}
    command: ["/no-such-command"]
    network_mode: none
    vram_mb: 2000
    priority: 30
    stop_timeout_s: 2
    start_timeout_s: 20
"""
    d = DaemonProc(tmp_path, extra_services=extra).start()
    try:
        t0 = time.monotonic()
        r = d.post("/gpu/service/broken/start")
        assert r.status_code == 502, r.text
        assert time.monotonic() - t0 < 20
        detail = r.json()["detail"]
        assert "no-such-command" in detail or "executable file not found" in detail, detail
        status = d.status()
        assert status["services"]["broken"]["state"] == "failed"
        assert status["lock"]["holder"] is None
        container = docker_client.containers.get(name)
        assert container.status != "running"
        assert d.post("/gpu/prepare-phase/3").status_code == 200
    finally:
        d.close()
        with contextlib.suppress(Exception):
            docker_client.containers.get(name).remove(force=True)


@pytest.mark.redis
def test_sigterm_while_a_start_hangs_exits_in_bounded_time_and_frees_the_lock(
        tmp_path: Path, redis_server: RedisServer) -> None:
    port = free_port()
    extra = f"""
  slowpoke:
    type: native
    vram_mb: 1000
    priority: 5
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--vram-mb", "1000",
              "--port", "{port}", "--startup-s", "600"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 0.5}}
    start_timeout_s: 300
"""
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.flushdb()
    d = DaemonProc(tmp_path, extra_services=extra, redis_url=redis_server.url,
                   env={"GPU_MANAGER_SHUTDOWN_TIMEOUT_S": "2"}).start()
    answer: dict[str, Any] = {}

    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):
            answer["r"] = d.post("/gpu/service/slowpoke/start")

    caller = threading.Thread(target=call)  # a client waiting on the hung start
    caller.start()
    try:
        wait_for(lambda: d.states()["slowpoke"] == "starting", 10, "the start under way")
        assert r.get("gpu_mutex") is not None  # the transition holds the GPU lock
        assert d.proc is not None
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the daemon did not exit within 15s of SIGTERM:\n{d.log_text()}")
        took = time.monotonic() - t0
        # 2 s for open requests, 2 s for the operation, then bounded steps of shutdown
        assert took < 10, took
        assert r.get("gpu_mutex") is None, "the GPU lock outlived the daemon"
        caller.join(10)
        assert not caller.is_alive()
        log = d.log_text()
        assert "daemon stopped" in log
    finally:
        caller.join(1)
        d.close()
