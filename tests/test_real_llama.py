"""A real model server under the real daemon: llama-cpp-python's OpenAI server
(`llama_cpp.server`) on the CPU, with a tiny random model generated here, no download.

Every other server in the suite is a stand-in written from the servers' documentation; this
one checks that reading against the real thing: its start and health, its exit on SIGTERM
(uvicorn re-raises it: 143, a clean stop), a kill -9, the OpenAI SDK through the front door
(chat, streams, completions, embeddings, its own 400s, a stream it cuts), one server serving
two models from a --config_file, and a phase that swaps it with a stand-in. Its VRAM on the
simulated GPU is what `vram_mb` declares, held for its pid by `gpu_manager.sim.hold`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import ROOT, DaemonProc, Sampler
from tests.support.env import free_port, wait_for
from tests.support.llama import (
    VRAM_MB,
    events_through,
    llama_service,
    make_model,
    require_llama,
    server_args,
    service,
    wait_service,
)

pytestmark = pytest.mark.timeout(90)
CHAT = [{"role": "user", "content": "hello"}]
# Past the first backoff of the restart policy (1 s, doubled per failure in its window).
FIRST_BACKOFF_S = 1.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_llama()
    base = tmp_path_factory.mktemp("models")
    return {"a": make_model(base / "tiny-a.gguf", seed=0),
            "b": make_model(base / "tiny-b.gguf", seed=1),
            # a longer context: a stream long enough (seconds) to be cut in the middle
            "long": make_model(base / "tiny-long.gguf", seed=2, context=2048)}


@pytest.fixture
def daemon_with(tmp_path: Path) -> Iterator[list[DaemonProc]]:
    """Daemons a test starts (`DaemonProc(...).start()` appended), closed afterwards."""
    started: list[DaemonProc] = []
    yield started
    for d in started:
        d.close()


def one_llama(tmp_path: Path, models: dict[str, Path], started: list[DaemonProc], *,
              model: str = "a", n_ctx: int = 512, serve: bool = False,
              extra_phases: str = "") -> tuple[DaemonProc, int]:
    port = free_port()
    block = llama_service("llama", port, server_args(models[model], port, "tiny", n_ctx),
                          models=["tiny"] if serve else None)
    d = DaemonProc(tmp_path, extra_services=block, extra_phases=extra_phases)
    started.append(d)
    return d.start(), port


def registered(d: DaemonProc) -> dict[int, int]:
    """pid -> MB of what holds memory on the simulated GPU now."""
    return {r.pid: r.mb for r in SimRegistry(d.sim_dir).active() if r.dead_since is None}


def test_the_example_inventory_is_valid() -> None:
    exe = Path(sys.executable).with_name("gpu-manager")
    res = subprocess.run([str(exe), "check-config", "-c", str(ROOT / "examples" / "llama_cpp")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hold_fails_like_cuda_without_room_and_127_without_the_command(
        tmp_path: Path) -> None:
    sim = SimRegistry(tmp_path / "sim")
    sim.write_gpu(1000, 0, 0)
    env = {**os.environ, "GPU_MANAGER_SIM_DIR": str(sim.root)}
    hold = [sys.executable, "-m", "gpu_manager.sim.hold"]
    full = subprocess.run([*hold, "--vram-mb", "2000", "--", "true"], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert full.returncode == 3 and "CUDA out of memory" in full.stderr
    gone = subprocess.run([*hold, "--vram-mb", "10", "--", str(tmp_path / "nothing")], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert gone.returncode == 127 and "cannot run" in gone.stderr
    ran = subprocess.run([*hold, "--vram-mb", "10", "--", "sh", "-c", "exit 7"], env=env,
                         capture_output=True, text=True, timeout=30, check=False)
    assert ran.returncode == 7  # exec'd: the command's own exit status


def test_started_measured_and_stopped_by_sigterm_as_a_clean_stop(
        tmp_path: Path, models: dict[str, Path], daemon_with: list[DaemonProc]) -> None:
    d, port = one_llama(tmp_path, models, daemon_with)
    r = d.post("/gpu/service/llama/start")
    assert r.status_code == 200, r.text
    svc = service(d, "llama")
    assert svc["state"] == "ready" and svc["health"] == "HTTP 200", svc
    (pid,) = svc["pids"]
    proc = psutil.Process(pid)
    assert "llama_cpp.server" in proc.cmdline()  # the hold exec'd the real server: same pid
    # what it holds on the (simulated) GPU is what it declares, registered for its pid; its
    # RSS (~80 MB of host RAM) is not VRAM
    assert svc["measured_mb"] == VRAM_MB and registered(d) == {pid: VRAM_MB}
    assert proc.memory_info().rss < VRAM_MB * 2**20 / 10
    assert {"pid": pid, "name": "llama", "memory_mb": VRAM_MB, "service": "llama"} \
        in d.status()["vram"]["processes"]
    # the server's own listing: the alias (without one it would be the file's path)
    listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
    assert [m["id"] for m in listed["data"]] == ["tiny"]

    r = d.post("/gpu/service/llama/stop")
    assert r.status_code == 200, r.text
    assert [(s["action"], s["status"]) for s in r.json()["plan"]["steps"]] == [("stop", "done")]
    svc = service(d, "llama")
    # uvicorn shut down, then re-raised the SIGTERM: a clean stop, not `failed`
    assert svc["state"] == "stopped" and svc["last_exit"] == "stopped by signal 15 (SIGTERM)"
    # reclaim: the simulated GPU has its memory back once the driver's teardown is over
    wait_for(lambda: pid not in registered(d) and not d.status()["vram"]["processes"], 5,
             "the stopped server's VRAM back")
    # restart: on-failure does not restart it: nothing was scheduled before a later
    # operation (an idempotent stop) ended
    again = d.post("/gpu/service/llama/stop").json()
    kinds = [(e["kind"], e.get("service")) for e in events_through(d, again["operation_id"])]
    assert ("restart_scheduled", "llama") not in kinds
    assert service(d, "llama")["restarts"] == 0


def test_kill_9_is_restarted_by_policy_after_its_backoff(
        tmp_path: Path, models: dict[str, Path], daemon_with: list[DaemonProc]) -> None:
    d, _ = one_llama(tmp_path, models, daemon_with)
    assert d.post("/gpu/service/llama/start").status_code == 200
    (pid,) = service(d, "llama")["pids"]
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    svc = wait_service(d, "llama", lambda s: s["state"] == "ready" and s["pids"]
                       and s["pids"] != [pid], 20, "the restart")
    assert time.monotonic() - killed_at >= FIRST_BACKOFF_S
    assert svc["restarts"] == 1 and svc["last_exit"] == "killed by signal 9"
    (new,) = svc["pids"]
    assert "llama_cpp.server" in psutil.Process(new).cmdline()
    wait_for(lambda: registered(d) == {new: VRAM_MB}, 5, "the new server's VRAM only")
    done = d.post("/gpu/service/llama/stop").json()
    scheduled = [e for e in events_through(d, done["operation_id"])
                 if e["kind"] == "restart_scheduled" and e["service"] == "llama"]
    assert [(e["in_s"], "killed by signal 9" in e["reason"]) for e in scheduled] == [
        (FIRST_BACKOFF_S, True)]


def test_the_openai_sdk_through_the_front_door(
        tmp_path: Path, models: dict[str, Path], daemon_with: list[DaemonProc]) -> None:
    d, port = one_llama(tmp_path, models, daemon_with, model="long", n_ctx=2048, serve=True)
    client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0,
                           timeout=30)
    assert service(d, "llama")["state"] == "stopped"

    # a cold start on the first request: the real server started, then asked
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8)
    assert reply.model == "tiny" and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert (reply.choices[0].message.content or "").isprintable()
    svc = service(d, "llama")
    assert svc["state"] == "ready" and svc["serve"]["request_starts"] == 1

    text = client.completions.create(model="tiny", prompt="hello", max_tokens=5)
    assert text.choices[0].finish_reason == "length" and text.usage is not None
    assert text.usage.completion_tokens == 5

    # streamed: the role alone first, one chunk per token, the finish, then [DONE]
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6,
                                                 stream=True))
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", None)
    assert len([c for c in chunks if c.choices[0].delta.content]) == 6
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"

    # a stream longer than the health check's interval (0.5 s) arrives whole: the check is on
    # /openapi.json, which takes no model lock (one on /v1/models would end it early)
    t0 = time.monotonic()
    long = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1000,
                                               stream=True, logprobs=True, top_logprobs=20))
    assert time.monotonic() - t0 > 0.5
    assert len([c for c in long if c.choices[0].delta.content]) == 1000
    assert long[-1].choices[0].finish_reason == "length"

    vectors = client.embeddings.create(model="tiny", input=["hello", "world"])
    assert [len(v.embedding) for v in vectors.data] == [64, 64]

    # beyond its context: the server's own 400, passed through unchanged
    too_long = {"model": "tiny", "messages": [{"role": "user", "content": "a " * 2100}],
                "max_tokens": 4}
    direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=too_long,
                        timeout=30)
    assert direct.status_code == 400, direct.text
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**too_long)  # type: ignore[call-overload]
    assert err.value.response.json() == direct.json()
    assert direct.json()["error"]["code"] == "context_length_exceeded"
    # ...and streamed: the server answers 200, then ends the stream empty with no [DONE] or
    # drops the connection (its error escapes the event stream): an error either way, never
    # an empty answer that looks whole
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(**too_long, stream=True))  # type: ignore[call-overload]

    # a stream the server cuts (SIGTERM in the middle: no finish_reason, no [DONE], the
    # connection dropped): the SDK raises, it never ends as if whole
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2000,
                                            stream=True, logprobs=True, top_logprobs=20)
    chunks_seen = iter(stream)
    next(chunks_seen)
    (pid,) = service(d, "llama")["pids"]
    os.kill(pid, signal.SIGTERM)
    finishes = []
    with pytest.raises(openai.APIError):
        finishes.extend(c.choices[0].finish_reason for c in chunks_seen if c.choices)
    assert set(finishes) <= {None} and len(finishes) < 1999
    # its own SIGTERM exit is a clean one: stopped, and not restarted (restart: on-failure).
    # (Between the signal and the exit it no longer listens: `unhealthy` for a moment.)
    svc = wait_service(d, "llama", lambda s: s["state"] in ("stopped", "failed"), 10,
                       "the exit seen")
    assert svc["state"] == "stopped", svc
    assert svc["reason"].startswith("stopped by signal 15 (SIGTERM) while "), svc
    again = d.post("/gpu/service/llama/stop").json()
    kinds = [(e["kind"], e.get("service")) for e in events_through(d, again["operation_id"])]
    assert ("restart_scheduled", "llama") not in kinds


def test_two_models_of_one_config_file_server(
        tmp_path: Path, models: dict[str, Path], daemon_with: list[DaemonProc]) -> None:
    port = free_port()
    # with --config_file it listens where the file says (it ignores --host/--port)
    config = tmp_path / "llama.json"
    config.write_text(json.dumps({
        "host": "127.0.0.1", "port": port, "interrupt_requests": False, "models": [
            {"model": str(models[k]), "model_alias": f"tiny-{k}", "n_ctx": 512,
             "verbose": False} for k in ("a", "b")]}))
    block = llama_service("llama", port, ["--config_file", str(config)],
                          models=["tiny-a", "tiny-b"])
    d = DaemonProc(tmp_path, extra_services=block)
    daemon_with.append(d)
    d.start()
    client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0,
                           timeout=30)
    listed = {m.id: (m.model_extra or {}).get("service") for m in client.models.list().data}
    assert listed["tiny-a"] == listed["tiny-b"] == "llama"

    def greedy(model: str) -> str:
        reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                               temperature=0)
        assert reply.model == model
        return reply.choices[0].message.content or ""

    a1 = greedy("tiny-a")
    (pid,) = service(d, "llama")["pids"]
    b1 = greedy("tiny-b")  # the server swaps the model it holds, in the same process
    assert greedy("tiny-a") == a1 != b1  # each model answers as itself (other weights)
    svc = service(d, "llama")
    assert svc["pids"] == [pid] and svc["serve"]["request_starts"] == 1
    upstream = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
    assert [m["id"] for m in upstream["data"]] == ["tiny-a", "tiny-b"]


def test_a_phase_swaps_the_real_server_with_a_stand_in(
        tmp_path: Path, models: dict[str, Path], daemon_with: list[DaemonProc]) -> None:
    """AC-style: phase 6 needs the real server (6000 MB), phase 4 ComfyUI's stand-in (20000
    MB); both do not fit in the 23552 MB budget, so each transition stops one, waits for its
    memory to come back, and starts the other; the simulated GPU is never over-committed."""
    phase = "  6:\n    name: chat\n    services: [llama]\n"
    d, _ = one_llama(tmp_path, models, daemon_with, extra_phases=phase)
    sampler = Sampler(d.sim_dir, 24576)
    try:
        r = d.post("/gpu/prepare-phase/6")
        assert r.status_code == 200, r.text
        (pid,) = service(d, "llama")["pids"]
        r = d.post("/gpu/prepare-phase/4")
        assert r.status_code == 200, r.text
        steps = {(s["action"], s["service"]): s for s in r.json()["plan"]["steps"]}
        assert steps[("stop", "llama")]["status"] == "done"
        assert steps[("start", "comfyui")]["status"] == "done"
        states = d.states()
        assert (states["llama"], states["comfyui"]) == ("stopped", "ready")
        assert pid not in registered(d)
        r = d.post("/gpu/prepare-phase/6")
        assert r.status_code == 200, r.text
        svc = service(d, "llama")
        assert svc["state"] == "ready" and svc["pids"] != [pid]
        assert svc["measured_mb"] == VRAM_MB and d.states()["comfyui"] == "stopped"
    finally:
        sampler.stop()
    assert sampler.samples > 10 and sampler.max_used <= 24576
    assert {r.name for r in sampler.seen.values()} == {"llama", "comfyui"}
