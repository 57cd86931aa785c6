"""The sleep/wake stand-ins (`--api KIND`): real processes on the simulated GPU, over HTTP.

Their OpenAI routes are read with the official openai SDK, ComfyUI's /ws with the websockets
client: the shapes are right when real clients parse them.
"""

from __future__ import annotations

import json
import time

import pytest

from gpu_manager.probe import SimulatedProbe
from tests.support.env import wait_for
from tests.support.standins import (
    FULL_MB,
    KINDS,
    RESIDUAL_MB,
    SLACK_S,
    SLEEP_S,
    TOTAL_MB,
    WAKE_S,
    call,
    do,
    held_mb,
    put_to_sleep,
    start,
    vllm_asleep,
)
from tests.support.workloads import Workload


@pytest.mark.parametrize("name", list(KINDS))
def test_sleep_releases_to_the_residual_and_wake_takes_it_back(
    sim: SimulatedProbe, workloads: list[Workload], name: str
) -> None:
    kind = KINDS[name]
    w = start(sim, workloads, kind.api)
    assert held_mb(sim, w.pid) == FULL_MB
    assert kind.asleep is None or kind.asleep(w.port) is False

    t0 = time.monotonic()
    res = do(w, kind.sleep)
    assert res.code == 200, res
    if kind.answers_before_release:
        # ComfyUI only sets a flag: the answer comes first, the memory goes later.
        assert res.elapsed < SLEEP_S and held_mb(sim, w.pid) == FULL_MB
        wait_for(lambda: held_mb(sim, w.pid) == RESIDUAL_MB, SLEEP_S + SLACK_S, "the release")
        released_after = time.monotonic() - t0
    else:
        # vLLM/SGLang/Ollama/TabbyAPI answer once the memory is gone.
        assert held_mb(sim, w.pid) == RESIDUAL_MB
        released_after = res.elapsed
    assert SLEEP_S - 0.02 <= released_after <= SLEEP_S + SLACK_S, released_after
    assert kind.asleep is None or kind.asleep(w.port) is True

    again = do(w, kind.sleep)  # already asleep: nothing to do, nothing to wait for
    assert again.code == kind.repeat_sleep_code and again.elapsed < SLEEP_S, again
    assert held_mb(sim, w.pid) == RESIDUAL_MB

    res = do(w, kind.wake)
    assert res.code == 200, res
    assert WAKE_S - 0.02 <= res.elapsed <= WAKE_S + SLACK_S, res.elapsed
    assert held_mb(sim, w.pid) == FULL_MB  # taken back before the answer
    assert kind.asleep is None or kind.asleep(w.port) is False

    again = do(w, kind.wake)  # already awake
    assert again.code == 200 and again.elapsed < WAKE_S, again
    assert held_mb(sim, w.pid) == FULL_MB
    assert sim.registry.oom_events() == []


@pytest.mark.parametrize("name", list(KINDS))
def test_wake_that_does_not_fit_fails_like_cuda_and_stays_asleep(
    sim: SimulatedProbe, workloads: list[Workload], name: str
) -> None:
    kind = KINDS[name]
    w = start(sim, workloads, kind.api)
    put_to_sleep(sim, w, kind)
    # An unmanaged job takes the room meanwhile: 1000 MB free, the wake needs 2800 more.
    sim.registry.set_foreign(TOTAL_MB - RESIDUAL_MB - 1000)
    res = do(w, kind.wake)
    assert res.code == 500 and b"CUDA out of memory" in res.body, res
    assert res.elapsed < WAKE_S  # refused at allocation, as CUDA does: no load time spent
    (event,) = sim.registry.oom_events()
    # free_mb is the room for the whole registration: the device's free MB plus its own
    assert (event["pid"], event["mb"], event["resize_from_mb"], event["free_mb"]) == (
        w.pid, FULL_MB, RESIDUAL_MB, 1000 + RESIDUAL_MB)
    assert held_mb(sim, w.pid) == RESIDUAL_MB  # nothing over-committed
    assert sim.sample().devices[0].used_mb == TOTAL_MB - 1000
    assert kind.asleep is None or kind.asleep(w.port) is True

    sim.registry.set_foreign(0)  # the room is back: the same wake now works
    assert do(w, kind.wake).code == 200
    assert held_mb(sim, w.pid) == FULL_MB


@pytest.mark.parametrize("name", ["vllm", "ollama", "tabbyapi"])
def test_sleep_keeps_memory_fault(
    sim: SimulatedProbe, workloads: list[Workload], name: str
) -> None:
    kind = KINDS[name]
    w = start(sim, workloads, kind.api, "--sleep-keeps-memory")
    res = do(w, kind.sleep)
    assert res.code == 200 and res.elapsed >= SLEEP_S - 0.02, res
    assert kind.asleep is not None and kind.asleep(w.port) is True  # it says it slept...
    assert held_mb(sim, w.pid) == FULL_MB  # ...but the GPU says otherwise
    assert do(w, kind.wake).code == 200
    assert held_mb(sim, w.pid) == FULL_MB


def test_vllm_level_2_wake_reloads_the_weights(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    startup_s = 0.5
    w = start(sim, workloads, "vllm", "--startup-s", str(startup_s))
    wait_for(lambda: call(w.port, "GET", "/is_sleeping").code == 200, startup_s + SLACK_S,
             "the end of start-up")
    assert call(w.port, "POST", "/sleep?level=2").code == 200
    assert held_mb(sim, w.pid) == RESIDUAL_MB
    res = call(w.port, "POST", "/wake_up")
    # level 2 dropped the weights from host RAM too: waking loads them again
    assert res.code == 200 and res.elapsed >= WAKE_S + startup_s - 0.02, res.elapsed
    assert call(w.port, "POST", "/sleep?level=1").code == 200
    res = call(w.port, "POST", "/wake_up")
    assert res.code == 200 and WAKE_S - 0.02 <= res.elapsed < WAKE_S + startup_s, res.elapsed
    assert call(w.port, "POST", "/sleep?level=3").code == 400


def test_vllm_wakes_by_tag(sim: SimulatedProbe, workloads: list[Workload]) -> None:
    w = start(sim, workloads, "vllm", "--weights-mb", "1000")
    assert call(w.port, "POST", "/sleep").code == 200
    assert call(w.port, "POST", "/wake_up?tags=weights").code == 200
    assert held_mb(sim, w.pid) == RESIDUAL_MB + 1000
    assert vllm_asleep(w.port) is True  # the KV cache still sleeps
    assert call(w.port, "POST", "/wake_up?tags=kv_cache").code == 200
    assert held_mb(sim, w.pid) == FULL_MB and vllm_asleep(w.port) is False
    assert call(w.port, "POST", "/wake_up?tags=nonsense").code == 400


def test_sglang_releases_by_tag(sim: SimulatedProbe, workloads: list[Workload]) -> None:
    w = start(sim, workloads, "sglang", "--weights-mb", "1000")
    res = call(w.port, "POST", "/release_memory_occupation", {"tags": ["kv_cache"]})
    assert res.code == 200 and held_mb(sim, w.pid) == FULL_MB - (FULL_MB - RESIDUAL_MB - 1000)
    assert call(w.port, "POST", "/release_memory_occupation", {"tags": ["weights"]}).code == 200
    assert held_mb(sim, w.pid) == RESIDUAL_MB
    assert call(w.port, "POST", "/resume_memory_occupation", {"tags": None}).code == 200
    assert held_mb(sim, w.pid) == FULL_MB


def test_comfyui_and_ollama_extras(sim: SimulatedProbe, workloads: list[Workload]) -> None:
    comfy = start(sim, workloads, "comfyui")
    stats = call(comfy.port, "GET", "/system_stats").json()["devices"][0]
    assert (stats["vram_total"], stats["vram_free"]) == (TOTAL_MB * 2**20,
                                                         (TOTAL_MB - FULL_MB) * 2**20)
    # neither flag set: ComfyUI frees nothing
    assert call(comfy.port, "POST", "/free", {}).code == 200
    first = call(comfy.port, "POST", "/prompt", {"prompt": {}}).json()
    assert first["number"] == 0 and first["node_errors"] == {} and first["prompt_id"]
    assert held_mb(sim, comfy.pid) == FULL_MB

    ollama = start(sim, workloads, "ollama")
    assert call(ollama.port, "GET", "/").body == b"Ollama is running"
    assert call(ollama.port, "GET", "/api/tags").json()["models"][0]["name"] == "m:latest"
    res = call(ollama.port, "POST", "/api/chat", {"model": "m:latest", "messages": [],
                                                    "keep_alive": "0s"}).json()
    assert (res["done"], res["done_reason"]) == (True, "unload")
    assert held_mb(sim, ollama.pid) == RESIDUAL_MB
    res = call(ollama.port, "POST", "/api/generate", {"model": "m"}).json()
    assert (res["model"], res["done"], res["done_reason"]) == ("m", True, "load")
    assert call(ollama.port, "POST", "/api/generate", {"model": "other"}).code == 404


def test_tabby_load_streams_progress(sim: SimulatedProbe, workloads: list[Workload]) -> None:
    w = start(sim, workloads, "tabbyapi")
    assert call(w.port, "GET", "/v1/model").json()["id"] == "m"
    assert call(w.port, "POST", "/v1/model/unload").code == 200
    res = call(w.port, "POST", "/v1/model/load", {"model_name": "m"})
    events = [json.loads(line[len("data: "):]) for line in res.body.decode().splitlines()
              if line.startswith("data: ")]
    assert res.code == 200 and events[-1]["status"] == "finished"
    assert call(w.port, "POST", "/v1/model/load", {"model_name": "x"}).code == 400


def test_api_answers_503_while_starting(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    w = Workload(sim.registry.root, FULL_MB, "--api", "vllm", "--startup-s", "30")
    workloads.append(w)
    w.wait_registered()
    assert call(w.port, "POST", "/sleep").code == 503
    assert held_mb(sim, w.pid) == FULL_MB


def test_without_api_post_is_still_unsupported(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    w = Workload(sim.registry.root, 100)
    workloads.append(w)
    w.wait_registered()
    assert call(w.port, "POST", "/sleep").code == 501
    assert call(w.port, "GET", "/is_sleeping").code == 404


# -- OpenAI routes ---------------------------------------------------------------------------
