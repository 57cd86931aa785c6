"""Clients and compatibility against the real daemon and real Redis: GPUClient leases, the
legacy /gemma wire form, the legacy gpu_manager.py module, Ollama eviction, cooperative pause."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import redis

from gpu_manager.client import GPUClient, GPURequestPriority
from tests.support.daemon import ROOT, DaemonProc
from tests.support.env import RedisServer, free_port, wait_for

pytestmark = pytest.mark.redis


def legacy_module() -> ModuleType:
    """compat/gpu_manager.py under another name, so it does not shadow our package here."""
    spec = importlib.util.spec_from_file_location("legacy_gpu_manager",
                                                  ROOT / "compat" / "gpu_manager.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_shim_is_the_package_module() -> None:
    # One source: gpu_manager/legacy.py (what `import gpu_manager` serves) is a link to
    # compat/gpu_manager.py (what users copy over the old file), never a second copy.
    shim = ROOT / "compat" / "gpu_manager.py"
    module = ROOT / "gpu_manager" / "legacy.py"
    assert module.is_symlink() and not shim.is_symlink()
    assert module.resolve() == shim.resolve()
    import gpu_manager.legacy as package_module

    assert Path(package_module.__file__ or "").resolve() == shim.resolve()
    assert legacy_module().GPUManager.__doc__ == package_module.GPUManager.__doc__


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    r.flushdb()
    yield r
    r.flushdb()


@pytest.fixture
def daemon(tmp_path: Path, redis_server: RedisServer, rdb: redis.Redis) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, redis_url=redis_server.url).start()
    yield d
    d.close()


def client(d: DaemonProc, **kw: Any) -> GPUClient:
    return GPUClient(d.url, timeout_seconds=kw.pop("timeout", 10), **kw)


async def test_immediate_beats_background(daemon: DaemonProc) -> None:
    holder = client(daemon, vram_mb=20000)
    background = client(daemon, vram_mb=20000, timeout=20)
    immediate = client(daemon, vram_mb=20000, timeout=20)
    try:
        got = await holder.request_gpu("holder", GPURequestPriority.BACKGROUND)
        assert got.acquired and got.task_id and got.task_id.startswith("ml-holder-")
        bg = asyncio.create_task(background.request_gpu("xgboost", GPURequestPriority.BACKGROUND))
        await asyncio.sleep(0.3)  # the background request is queued first
        im = asyncio.create_task(immediate.request_gpu("ctgan", GPURequestPriority.IMMEDIATE))
        await asyncio.sleep(0.3)
        assert not bg.done() and not im.done()  # both wait: 20000 + 20000 do not fit
        assert await holder.release_gpu()
        first = await im
        assert first.acquired, first.error
        assert not bg.done(), "BACKGROUND got the GPU before the waiting IMMEDIATE"
        assert await immediate.release_gpu()
        second = await bg
        assert second.acquired and second.acquisition_time_ms > 600
        state = daemon.get("/gpu/state").json()
        assert state["owner"] == "xgboost" and state["state"] == "acquired"
        assert state["redis_connected"] is True
    finally:
        for c in (holder, background, immediate):
            await c.close()


async def test_lease_preempts_lower_priority_services_only(daemon: DaemonProc) -> None:
    assert daemon.post("/gpu/service/cosyvoice/start").status_code == 200  # priority 50
    background = client(daemon, vram_mb=20000, timeout=1)
    refused = await background.request_gpu("xgboost", GPURequestPriority.BACKGROUND)  # 20
    assert not refused.acquired and "timed out" in (refused.error or "")
    assert daemon.states()["cosyvoice"] == "ready"
    immediate = client(daemon, vram_mb=20000)
    try:
        got = await immediate.request_gpu("ctgan")  # IMMEDIATE = 90 > 50
        assert got.acquired, got.error
        assert daemon.states()["cosyvoice"] == "stopped"
        status = daemon.status()
        assert [x["requester"] for x in status["leases"]] == ["ctgan"]
        blocked = daemon.post("/gpu/service/comfyui/start")  # 100 cannot stop a lease
        assert blocked.status_code == 409
        assert blocked.json()["blockers"][0]["name"].startswith("lease:ml-ctgan-")
    finally:
        await immediate.close()


def test_dead_client_loses_its_lease_at_ttl(daemon: DaemonProc) -> None:
    code = (f"import asyncio, os, signal\n"
            f"from gpu_manager.client import GPUClient\n"
            f"async def main():\n"
            f"    c = GPUClient({daemon.url!r}, vram_mb=20000, ttl_s=1.0)\n"
            f"    r = await c.request_gpu('doomed')\n"
            f"    print('acquired' if r.acquired else r.error, flush=True)\n"
            f"    os.kill(os.getpid(), signal.SIGKILL)\n"
            f"asyncio.run(main())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.stdout.strip() == "acquired" and proc.returncode == -signal.SIGKILL
    died = time.monotonic()
    assert daemon.get("/gpu/state").json()["owner"] == "doomed"
    wait_for(lambda: daemon.get("/gpu/state").json()["state"] == "idle", 5, "the lease to expire")
    expired_after = time.monotonic() - died
    assert expired_after <= 1.0 + 0.5
    assert daemon.post("/gpu/service/comfyui/start").status_code == 200


async def test_renewal_keeps_a_live_client_past_its_ttl(daemon: DaemonProc) -> None:
    c = client(daemon, vram_mb=1000, ttl_s=0.6)
    try:
        assert (await c.request_gpu("steady")).acquired
        await asyncio.sleep(2.0)  # three TTLs: only renewal keeps it
        assert c.is_acquired
        assert daemon.get("/gpu/state").json()["owner"] == "steady"
    finally:
        await c.close()
    assert daemon.get("/gpu/state").json()["state"] == "idle"


def test_legacy_wire_form(daemon: DaemonProc) -> None:
    headers = {"X-Service-ID": "ml-service", "X-Request-Source": "gpu-client"}
    body = {"task_id": "ml-ctgan-1a2b3c4d", "messages": [], "context": [], "max_tokens": 0,
            "temperature": 0.0}
    resp = httpx.post(f"{daemon.url}/gemma/request", json=body, headers=headers,
                      trust_env=False, timeout=30)
    assert resp.status_code == 200
    data = resp.json()
    assert set(data) == {"task_id", "status", "message"}
    assert (data["task_id"], data["status"]) == ("ml-ctgan-1a2b3c4d", "gpu_acquired")
    status = httpx.get(f"{daemon.url}/status", trust_env=False).json()
    assert status["gpu_available"] is False and status["current_owner"] == "ml-service"
    rel = httpx.post(f"{daemon.url}/gemma/release/ml-ctgan-1a2b3c4d", json={},
                     headers=headers, trust_env=False)
    assert rel.status_code == 200
    assert rel.json() == {"status": "released", "task_id": "ml-ctgan-1a2b3c4d"}
    again = httpx.post(f"{daemon.url}/gemma/release/ml-ctgan-1a2b3c4d", json={},
                       trust_env=False)
    assert again.status_code == 404


async def test_client_falls_back_to_cpu_and_never_raises() -> None:
    c = GPUClient(f"http://127.0.0.1:{free_port()}", timeout_seconds=1, retry_attempts=1)
    t0 = time.monotonic()
    result = await c.request_gpu("ctgan")
    assert not result.acquired and "unreachable" in (result.error or "")
    assert time.monotonic() - t0 >= 0.5  # one retry after 0.5 s
    assert not await c.check_coordinator_health()
    async with c.gpu_context("ctgan") as on_gpu:
        assert on_gpu is False
    await c.close()


def test_legacy_v1_and_daemon_exclude_each_other(daemon: DaemonProc, redis_server: RedisServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("OLLAMA_URL", f"http://127.0.0.1:{free_port()}")
    legacy = legacy_module()
    mgr = legacy.GPUManager()
    assert (mgr.lock_key, mgr.default_timeout) == ("gpu_mutex", 300)
    with mgr.acquire_gpu("comfyui") as ok:  # also tries to unload Ollama (unreachable: fine)
        assert ok is True
        resp = daemon.post("/gpu/prepare-phase/2")
        assert resp.status_code == 423 and resp.json()["holder"] == "comfyui"
        assert mgr.get_gpu_status()["holder"] == "comfyui"
    assert mgr.is_gpu_available()
    # the other way round: while a client holds a lease, the daemon owns gpu_mutex
    code = daemon.post("/gpu/acquire", json={"session_id": "s1", "requester": "ctgan",
                                             "vram_mb": 1000, "timeout_ms": 5000})
    assert code.status_code == 200 and code.json()["success"] is True
    holder = mgr.get_current_holder()
    assert holder is not None and holder.startswith("gpu-manager:")
    assert mgr.try_acquire_gpu("vidi") is False
    with pytest.raises(Exception, match="GPU busy - held by gpu-manager:"), \
            mgr.acquire_gpu("vidi"):
        pass
    rel = daemon.post("/gpu/release", json={"session_id": "s1", "requester": "ctgan"})
    assert rel.json()["success"] is True and rel.json()["session_duration_ms"] >= 0
    assert mgr.is_gpu_available()
    assert legacy.get_gpu_manager() is legacy.get_gpu_manager()


async def test_legacy_v2_goes_through_the_daemon(daemon: DaemonProc,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_MANAGER_URL", daemon.url)
    v2 = legacy_module().get_gpu_manager_v2()
    assert await v2.prepare_for_phase(2)
    assert daemon.states()["vidi"] == "ready"
    assert await v2.can_start_service("comfyui")
    async with v2.use_service("cosyvoice") as ok:
        assert ok and daemon.states()["cosyvoice"] == "ready"
    assert (await v2.get_vram_status())["total_mb"] == 24576
    assert await v2.get_lock_holder() is None
    assert await v2.release_all()
    assert not await v2.prepare_for_phase(42)


OLLAMA = """
  ollama:
    type: native
    vram_mb: 18000
    priority: 10
    command: ["{{python}}", "-m", "tests.support.fakes", "ollama", "--port", "{port}",
              "--model", "qwen2.5:32b", "--model-mb", "18000"]
    cwd: {root}
    health: {{url: "http://127.0.0.1:{port}/health", interval_s: 1}}
    evict: {{strategy: ollama, url: "http://127.0.0.1:{port}", timeout_s: 5}}
"""


def test_ollama_eviction_frees_vram_without_stopping(tmp_path: Path, redis_server: RedisServer,
                                                     rdb: redis.Redis) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, redis_url=redis_server.url)
    services = (d.config_dir / "services.yaml").read_text()
    head, _, _ = services.partition("\n  ollama:\n")
    (d.config_dir / "services.yaml").write_text(head + OLLAMA.format(port=port, root=ROOT))
    d.start()
    try:
        assert d.post("/gpu/prepare-phase/2").status_code == 200
        assert d.post("/gpu/service/ollama/start").status_code == 200  # kept beside vidi
        assert d.status()["vram"]["used_mb"] == 18000 + 4000
        r4 = d.post("/gpu/prepare-phase/4")  # comfyui needs 20000: ollama must give way
        assert r4.status_code == 200, r4.text
        steps = {s["service"]: s for s in r4.json()["plan"]["steps"]}
        # the deprecated `evict:` is read as `sleep: {api: ollama}`
        assert steps["ollama"]["action"] == "sleep", steps
        assert steps["ollama"]["detail"].startswith("unloaded qwen2.5:32b;"), steps
        status = d.status()
        assert status["services"]["ollama"]["state"] == "sleeping"  # still up, just empty
        assert status["sleeping"] == ["ollama"]
        ps = httpx.get(f"http://127.0.0.1:{port}/api/ps", trust_env=False).json()
        assert ps == {"models": []}
        assert status["vram"]["used_mb"] == 20000
    finally:
        d.close()


TRANSCRIPTION = """
  transcription:
    type: native
    vram_mb: 8000
    priority: 30
    command: ["{{python}}", "-m", "tests.support.fakes", "transcription", "--port", "{port}",
              "--vram-mb", "8000", "--redis-url", "{redis}"]
    cwd: {root}
    health: {{url: "http://127.0.0.1:{port}/health", interval_s: 1}}
    preempt: {{strategy: pause, protocol: redis, ack_timeout_s: 5, freed_timeout_s: 10}}
"""


async def test_pause_and_resume_around_an_immediate_acquire(
    tmp_path: Path, redis_server: RedisServer, rdb: redis.Redis
) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, redis_url=redis_server.url,
                   extra_services=TRANSCRIPTION.format(port=port, root=ROOT,
                                                       redis=redis_server.url))
    d.start()
    owners: list[str] = []
    pubsub = rdb.pubsub()
    pubsub.subscribe("gpu_owner")
    c = client(d, vram_mb=20000)
    try:
        assert d.post("/gpu/service/transcription/start").status_code == 200
        assert d.status()["vram"]["used_mb"] == 8000
        got = await c.request_gpu("ctgan")  # 20000 + 8000 > 23552: pause transcription
        assert got.acquired, got.error
        status = d.status()
        assert status["services"]["transcription"]["state"] == "sleeping"
        assert status["sleeping"] == ["transcription"]
        assert rdb.get("gpu_state") == "ctgan"
        assert await c.release_gpu()
        wait_for(lambda: rdb.get("gpu_state") == "transcription", 5, "the resume")
        wait_for(lambda: d.status()["vram"]["used_mb"] == 8000, 10, "the model reloaded")
        wait_for(lambda: d.status()["services"]["transcription"]["state"] == "ready", 10,
                 "awake again (wake_when_free)")
        assert d.status()["sleeping"] == []
        for _ in range(10):
            msg = pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                owners.append(msg["data"])
        assert owners[-1] == "transcription"
    finally:
        await c.close()
        pubsub.close()
        d.close()


def test_old_import_style_works_with_the_package(monkeypatch: pytest.MonkeyPatch,
                                                 redis_server: RedisServer) -> None:
    # Old code that did `import gpu_manager; gpu_manager.get_gpu_manager()` against the old
    # file keeps working with this package installed in its place.
    import gpu_manager

    monkeypatch.setenv("REDIS_URL", redis_server.url)
    mgr = gpu_manager.get_gpu_manager()
    assert isinstance(mgr, gpu_manager.GPUManager)
    assert mgr.try_acquire_gpu("vidi", timeout=5)
    assert mgr.get_current_holder() == "vidi"
    assert mgr.release_gpu("comfyui") is False  # not the holder: untouched
    assert mgr.release_gpu("vidi") is True
    with pytest.raises(AttributeError):
        _ = gpu_manager.no_such_name


async def test_status_says_who_holds_the_lock_now_not_who_took_it(
        daemon: DaemonProc, rdb: redis.Redis) -> None:
    """The Redis key keeps the label of the operation that first took the lock while client
    leases go on holding it; the status's `held_for` says who holds it now."""
    assert daemon.status()["lock"]["held_for"]["kind"] == "none"
    first, second = client(daemon, vram_mb=2000), client(daemon, vram_mb=2000)
    try:
        a = await first.request_gpu("ctgan")
        b = await second.request_gpu("xgboost")
        assert a.acquired and b.acquired and a.task_id and b.task_id
        held = daemon.status()["lock"]["held_for"]
        assert held == {"kind": "leases", "operations": [], "legacy": None,
                        "leases": sorted([a.task_id, b.task_id])}, held
        assert rdb.get("gpu_mutex") is not None  # legacy code sees the GPU as owned
        assert await first.release_gpu()
        held = daemon.status()["lock"]["held_for"]
        assert held["kind"] == "leases" and held["leases"] == [b.task_id], held
        assert await second.release_gpu()
        wait_for(lambda: daemon.status()["lock"]["held_for"]["kind"] == "none", 5,
                 "the lock to be free")
    finally:
        await first.close()
        await second.close()
