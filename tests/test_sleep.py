"""Sleep and wake on the real daemon and real stand-ins that speak each server's API, on the
simulated GPU: the release is confirmed by what the GPU shows for the service's pids.

The root inventory's comfyui (20000 MB, priority 100) needs the room of a 6000 MB sleeper
(priority 5) on the 23552 MB budget: with the sleeper asleep (300 MB kept) it fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gpu_manager.client import GPUClient
from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import DaemonProc
from tests.support.env import free_port, wait_for

STANDIN = ('["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "sleeper", '
           '"--vram-mb", "6000", "--port", "{port}", "--startup-s", "0.3", "--api", "{kind}", '
           '"--sleep-s", "0.1", "--wake-s", "0.1", "--sleep-vram-mb", "300", '
           '"--model", "m1"{extra}]')
SLEEPER = """
  sleeper:
    type: native
    vram_mb: 6000
    priority: 5
    command: {command}
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 1}}
    start_timeout_s: 20
    stop_timeout_s: 5
    sleep: {sleep}
"""
URL = "http://127.0.0.1:{port}"
BLOCKS = {
    "vllm": "{{api: vllm, url: '" + URL + "', residual_mb: 500, timeout_s: 5}}",
    "vllm-level-2": "{{api: vllm, url: '" + URL + "', level: 2, residual_mb: 500, "
                    "timeout_s: 5}}",
    "sglang": "{{api: sglang, url: '" + URL + "', residual_mb: 500, timeout_s: 5}}",
    "comfyui": "{{api: comfyui, url: '" + URL + "', residual_mb: 500, timeout_s: 5}}",
    "ollama": "{{api: ollama, url: '" + URL + "', residual_mb: 500, timeout_s: 5}}",
    "tabbyapi": "{{api: tabbyapi, url: '" + URL + "', models: [m1], residual_mb: 500, "
                "timeout_s: 5}}",
    # the generic kind, spoken to the vLLM stand-in
    "http": "{{api: http, url: '" + URL + "', residual_mb: 500, timeout_s: 5, "
            "sleep: {{method: POST, path: '/sleep?level=1'}}, "
            "wake: {{method: POST, path: /wake_up}}, "
            "asleep: {{path: /is_sleeping, field: is_sleeping, equals: true}}}}",
}
STANDIN_KIND = {"vllm-level-2": "vllm", "http": "vllm"}


def sleeper(kind: str, port: int, extra: str = "") -> str:
    standin = STANDIN_KIND.get(kind, kind)
    command = STANDIN.format(port=port, kind=standin, extra=extra)
    return SLEEPER.format(command=command, port=port, sleep=BLOCKS[kind].format(port=port))


def held_mb(d: DaemonProc, name: str) -> int:
    """What the simulated GPU holds for the service's pids."""
    pids = set(d.status()["services"][name]["pids"])
    return sum(r.mb for r in SimRegistry(d.sim_dir).active() if r.pid in pids)


def step_of(body: dict[str, Any], service: str) -> dict[str, Any]:
    return next(s for s in body["plan"]["steps"] if s["service"] == service)


def awake_per_api(kind: str, port: int) -> bool | None:
    """What the stand-in's own API says, where it has a way to tell."""
    base = f"http://127.0.0.1:{port}"
    if kind in ("vllm", "vllm-level-2", "http"):
        return not httpx.get(f"{base}/is_sleeping", trust_env=False).json()["is_sleeping"]
    if kind == "ollama":
        return bool(httpx.get(f"{base}/api/ps", trust_env=False).json()["models"])
    if kind == "tabbyapi":
        return httpx.get(f"{base}/v1/model", trust_env=False).status_code == 200
    return None


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_each_api_sleeps_and_wakes_its_standin_confirmed_on_the_gpu(
        tmp_path: Path, kind: str) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=sleeper(kind, port)).start()
    try:
        assert d.post("/gpu/service/sleeper/start").status_code == 200
        assert held_mb(d, "sleeper") == 6000
        r = d.post("/gpu/service/comfyui/start")  # needs the sleeper's room
        assert r.status_code == 200, r.text
        step = step_of(r.json(), "sleeper")
        assert step["action"] == "sleep" and step["preemption"], step
        assert "300 MB left on the GPU" in step["detail"], step
        status = d.status()
        assert status["services"]["sleeper"]["state"] == "sleeping"
        assert status["sleeping"] == ["sleeper"]
        assert held_mb(d, "sleeper") == 300  # the process lives, its model is off the GPU
        assert awake_per_api(kind, port) in (False, None)

        assert d.post("/gpu/service/comfyui/stop").status_code == 200
        r = d.post("/gpu/service/sleeper/start")  # wakes it: no cold start
        assert r.status_code == 200, r.text
        (wake,) = r.json()["plan"]["steps"]
        assert wake["action"] == "wake" and wake["mb"] == 6000 - 300, wake
        assert "started cold" not in (wake["detail"] or ""), wake
        assert d.states()["sleeper"] == "ready"
        if kind != "comfyui":  # ComfyUI loads its model with the next prompt, not at wake
            assert held_mb(d, "sleeper") == 6000
            assert awake_per_api(kind, port) in (True, None)
        body = d.status()["services"]["sleeper"]
        assert (body["sleeps"], body["wakes"], body["restarts"]) == (1, 1, 0)
    finally:
        d.close()


def test_a_service_that_answers_sleep_but_keeps_its_memory_is_stopped(tmp_path: Path) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=sleeper(
        "vllm", port, ', "--sleep-keeps-memory"')).start()
    try:
        assert d.post("/gpu/service/sleeper/start").status_code == 200
        r = d.post("/gpu/service/comfyui/start")
        assert r.status_code == 200, r.text
        step = step_of(r.json(), "sleeper")
        assert step["action"] == "sleep", step
        assert "still holds 6000 MB" in step["detail"], step
        assert "stopped instead" in step["detail"], step
        assert d.states() == {**d.states(), "sleeper": "stopped", "comfyui": "ready"}
    finally:
        d.close()


def test_explicit_sleep_route_and_its_refusals(tmp_path: Path) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=sleeper("vllm", port)).start()
    try:
        r = d.post("/gpu/service/sleeper/sleep")
        assert r.status_code == 409 and r.json()["error"] == "not_running", r.text
        r = d.post("/gpu/service/vidi/sleep")
        assert r.status_code == 409 and r.json()["error"] == "cannot_sleep", r.text
        assert d.post("/gpu/service/sleeper/start").status_code == 200
        r = d.post("/gpu/service/sleeper/sleep")
        assert r.status_code == 200, r.text
        assert d.states()["sleeper"] == "sleeping"
        wait_for(lambda: d.status()["vram"]["used_mb"] == 300, 5, "the GPU to show 300 MB")
        metrics = d.get("/metrics").text
        assert 'gpu_manager_service_state{service="sleeper",state="sleeping"} 1.0' in metrics
        assert 'gpu_manager_sleeps_total{service="sleeper"} 1.0' in metrics
        r = d.post("/gpu/service/sleeper/stop")  # a stop reaches a sleeping service too
        assert r.status_code == 200 and d.states()["sleeper"] == "stopped"
    finally:
        d.close()


PREWARM_PHASES = """  7:
    name: look
    services: [vidi]
    next: 8
  8:
    name: speak
    services: [cosyvoice]
  9:
    name: draw-next
    services: [vidi]
    next: 10
  10:
    name: draw
    services: [comfyui]
"""


def prewarm_ops(d: DaemonProc) -> list[dict[str, Any]]:
    ops = d.get("/gpu/operations").json()["operations"]
    return [op for op in ops if op["request"]["kind"] == "Prewarm"]


def settled(d: DaemonProc, count: int) -> bool:
    """`count` prewarm operations have ended and nothing is in flight."""
    done = [op for op in prewarm_ops(d) if op["status"] not in ("queued", "running")]
    return len(done) >= count and not d.status()["operations"]


async def test_prewarm_readies_the_next_phase_and_ranks_below_everything(
        tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, extra_phases=PREWARM_PHASES,
                   replace={"\nservices:\n": "\nprewarm: true\nservices:\n"}).start()
    try:
        assert d.post("/gpu/prepare-phase/7").status_code == 200  # vidi; then prewarm 8
        wait_for(lambda: settled(d, 1), 10, "the prewarm of phase 8")
        (op,) = prewarm_ops(d)
        assert [(s["action"], s["service"]) for s in op["steps"]] == [("start", "cosyvoice")]
        status = d.status()
        assert status["services"]["cosyvoice"]["state"] == "ready"
        assert status["prewarmed"] == ["cosyvoice"]
        assert status["services"]["cosyvoice"]["prewarmed"] is True
        # preempted like anything else, and first: a 17000 MB lease (priority 90) needs one
        # of vidi (priority 40) and cosyvoice (50, but prewarmed: below everything)
        c = GPUClient(d.url, vram_mb=17000, timeout_seconds=20)
        try:
            got = await c.request_gpu("ctgan")
            assert got.acquired, got.error
            assert d.states()["cosyvoice"] == "stopped" and d.states()["vidi"] == "ready"
            assert d.status()["prewarmed"] == []
        finally:
            await c.release_gpu()
            await c.close()
    finally:
        d.close()


def test_a_prewarmed_phase_answers_without_starting_anything(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, extra_phases=PREWARM_PHASES,
                   replace={"\nservices:\n": "\nprewarm: true\nservices:\n"}).start()
    try:
        assert d.post("/gpu/prepare-phase/7").status_code == 200
        wait_for(lambda: settled(d, 1), 10, "the prewarm of phase 8")
        r = d.post("/gpu/prepare-phase/8")
        assert r.status_code == 200, r.text
        assert [s["action"] for s in r.json()["plan"]["steps"]] == ["stop"]  # vidi only
        assert d.status()["prewarmed"] == []  # its phase came: an ordinary service again
        # prewarm fills only free room: comfyui (20000) does not fit beside vidi
        assert d.post("/gpu/prepare-phase/9").status_code == 200
        wait_for(lambda: settled(d, 2), 10, "the prewarm of phase 10")
        assert prewarm_ops(d)[-1]["steps"] == []
        assert d.states()["comfyui"] == "stopped"
    finally:
        d.close()


async def test_a_lease_preempts_a_sleeping_service(tmp_path: Path) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=sleeper("vllm", port)).start()
    c = GPUClient(d.url, vram_mb=23552, timeout_seconds=20)  # the whole budget
    try:
        assert d.post("/gpu/service/sleeper/start").status_code == 200
        assert d.post("/gpu/service/sleeper/sleep").status_code == 200
        got = await c.request_gpu("ctgan")  # even the 300 MB it keeps asleep are in the way
        assert got.acquired, got.error
        assert d.states()["sleeper"] == "stopped"
        ops = d.get("/gpu/operations").json()["operations"]
        (stop,) = ops[-1]["steps"][:1]
        assert (stop["action"], stop["service"], stop["mb"]) == ("stop", "sleeper", 300)
    finally:
        await c.close()
        d.close()
