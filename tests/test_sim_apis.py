"""The sleep/wake stand-ins (`--api KIND`): real processes on the simulated GPU, over HTTP.

Their OpenAI routes are read with the official openai SDK, ComfyUI's /ws with the websockets
client: the shapes are right when real clients parse them.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from websockets.sync.client import connect

from gpu_manager.probe import SimulatedProbe
from tests.support.env import wait_for
from tests.support.workloads import Workload

TOTAL_MB = 8000
FULL_MB = 3000
RESIDUAL_MB = 200
SLEEP_S = 0.4
WAKE_S = 0.3
SLACK_S = 2.0  # upper bound on scheduling noise on a busy 2-core machine


@dataclass(frozen=True)
class Http:
    code: int
    body: bytes
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, body: Any = None) -> Http:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Http(int(resp.status), resp.read(), time.monotonic() - t0)
    except urllib.error.HTTPError as exc:
        return Http(int(exc.code), exc.read(), time.monotonic() - t0)


@dataclass(frozen=True)
class Kind:
    api: str
    sleep: tuple[str, str, Any]
    wake: tuple[str, str, Any]
    asleep: Callable[[int], bool] | None  # what the server's own status endpoint says
    answers_before_release: bool = False
    repeat_sleep_code: int = 200


def _vllm_asleep(port: int) -> bool:
    return bool(call(port, "GET", "/is_sleeping").json()["is_sleeping"])


def _ollama_asleep(port: int) -> bool:
    models = call(port, "GET", "/api/ps").json()["models"]
    assert models == [] or models[0]["size_vram"] == (FULL_MB - RESIDUAL_MB) * 2**20
    return not models


def _tabby_asleep(port: int) -> bool:
    res = call(port, "GET", "/v1/model")
    assert res.code in (200, 503), res
    return res.code == 503


KINDS = {
    "vllm": Kind("vllm", ("POST", "/sleep?level=1", None), ("POST", "/wake_up", None),
                 _vllm_asleep),
    "sglang": Kind("sglang", ("POST", "/release_memory_occupation", {}),
                   ("POST", "/resume_memory_occupation", {}), None),
    "comfyui": Kind("comfyui", ("POST", "/free", {"unload_models": True, "free_memory": True}),
                    ("POST", "/prompt", {"prompt": {}}), None, answers_before_release=True),
    "ollama": Kind("ollama", ("POST", "/api/generate", {"model": "m", "keep_alive": 0}),
                   ("POST", "/api/generate", {"model": "m"}), _ollama_asleep),
    # TabbyAPI refuses an unload with nothing loaded (check_model_container): 503, not 200.
    "tabbyapi": Kind("tabbyapi", ("POST", "/v1/model/unload", None),
                     ("POST", "/v1/model/load", {"model_name": "m"}), _tabby_asleep,
                     repeat_sleep_code=503),
}


@pytest.fixture
def sim(tmp_path: Path) -> SimulatedProbe:
    return SimulatedProbe(tmp_path / "sim", total_mb=TOTAL_MB, release_delay_ms=300)


@pytest.fixture
def workloads() -> Iterator[list[Workload]]:
    started: list[Workload] = []
    yield started
    for w in started:
        w.stop()


def start(sim: SimulatedProbe, workloads: list[Workload], api: str, *extra: str) -> Workload:
    w = Workload(sim.registry.root, FULL_MB, "--api", api, "--model", "m",
                 "--sleep-vram-mb", str(RESIDUAL_MB), "--sleep-s", str(SLEEP_S),
                 "--wake-s", str(WAKE_S), *extra)
    workloads.append(w)
    w.wait_registered()
    return w


def held_mb(sim: SimulatedProbe, pid: int) -> int | None:
    proc = sim.sample().devices[0].process(pid)
    return None if proc is None else proc.used_mb


def do(w: Workload, step: tuple[str, str, Any]) -> Http:
    return call(w.port, *step)


def put_to_sleep(sim: SimulatedProbe, w: Workload, kind: Kind) -> Http:
    res = do(w, kind.sleep)
    assert res.code == 200, res
    wait_for(lambda: held_mb(sim, w.pid) == RESIDUAL_MB, SLEEP_S + SLACK_S, "the release")
    return res


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
    assert _vllm_asleep(w.port) is True  # the KV cache still sleeps
    assert call(w.port, "POST", "/wake_up?tags=kv_cache").code == 200
    assert held_mb(sim, w.pid) == FULL_MB and _vllm_asleep(w.port) is False
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
OPENAI_KINDS = ["vllm", "sglang", "ollama", "tabbyapi"]


def sdk(w: Workload) -> openai.OpenAI:
    # no retries: a 503 must reach the test, not be retried away
    return openai.OpenAI(base_url=f"http://127.0.0.1:{w.port}/v1", api_key="x", max_retries=0,
                         timeout=30)


def util(sim: SimulatedProbe, pid: int) -> int | None:
    proc = sim.sample().devices[0].process(pid)
    return None if proc is None else proc.util_pct


CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say hello"}]


@pytest.mark.parametrize("name", OPENAI_KINDS)
def test_openai_sdk_reads_every_route_and_503_while_asleep(
    sim: SimulatedProbe, workloads: list[Workload], name: str
) -> None:
    w = start(sim, workloads, name)
    with sdk(w) as c:
        (card,) = c.models.list().data
        assert (card.id, card.object) == ("m:latest" if name == "ollama" else "m", "model")

        chat = c.chat.completions.create(model="asked", messages=CHAT)
        text = chat.choices[0].message.content or ""
        assert (chat.object, chat.model, chat.choices[0].message.role) == (
            "chat.completion", "asked", "assistant")
        assert text == f"Hello from w, a stand-in {name} server answering with a fixed text."
        assert chat.choices[0].finish_reason == "stop" and chat.usage is not None
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens,
                chat.usage.total_tokens) == (2, 12, 14)
        capped = c.chat.completions.create(model="m", messages=CHAT, max_completion_tokens=2)
        assert (capped.choices[0].message.content, capped.choices[0].finish_reason) == (
            "Hello from", "length")

        comp = c.completions.create(model="asked", prompt="a b c", max_tokens=4)
        assert (comp.object, comp.model, comp.choices[0].text, comp.choices[0].finish_reason) \
            == ("text_completion", "asked", "Hello from w, a", "length")
        assert comp.usage is not None and comp.usage.prompt_tokens == 3

        chunks = list(c.chat.completions.create(model="asked", messages=CHAT, stream=True))
        assert all(ch.object == "chat.completion.chunk" and ch.model == "asked"
                   for ch in chunks)
        assert [ch.choices[0].delta.role for ch in chunks] == ["assistant"] + [None] * 12
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
        assert [ch.choices[0].finish_reason for ch in chunks] == [None] * 12 + ["stop"]

        # the SDK asks for base64 by default and decodes it; "float" comes as a JSON list
        packed = c.embeddings.create(model="asked", input=["one", "two"])
        floats = c.embeddings.create(model="asked", input=["one", "two"],
                                     encoding_format="float")
        assert packed.model == "asked" and [e.index for e in packed.data] == [0, 1]
        for a, b in zip(packed.data, floats.data, strict=True):
            assert len(a.embedding) == 8 and math.isclose(math.hypot(*b.embedding), 1.0)
            assert all(math.isclose(x, y, abs_tol=1e-6)
                       for x, y in zip(a.embedding, b.embedding, strict=True))
        assert floats.data[0].embedding != floats.data[1].embedding

        put_to_sleep(sim, w, KINDS[name])
        with pytest.raises(openai.InternalServerError) as refused:
            c.chat.completions.create(model="m", messages=CHAT)
        assert refused.value.status_code == 503
        key = "detail" if name == "tabbyapi" else "error"
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/embeddings", {"input": "x"})):
            res = call(w.port, "POST", path, {"model": "m", **body})
            assert res.code == 503 and key in res.json(), res
        assert do(w, KINDS[name].wake).code == 200
        assert c.completions.create(model="m", prompt="x").choices[0].text


def test_streamed_tokens_arrive_as_they_are_produced(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    token_s = 0.08
    w = start(sim, workloads, "vllm", "--token-ms", str(token_s * 1000))
    with sdk(w) as c:
        t0 = time.monotonic()
        arrived = [time.monotonic() - t0
                   for ch in c.completions.create(model="m", prompt="x", max_tokens=6,
                                                  stream=True)
                   if ch.choices[0].text]
        assert len(arrived) == 6
        for i, at in enumerate(arrived):  # paced from the start: never early
            assert at >= (i + 1) * token_s - 0.01, arrived
        # a reply sent only once complete would bring every chunk at once
        assert arrived[-1] - arrived[0] >= 3 * token_s, arrived
        t0 = time.monotonic()
        c.chat.completions.create(model="m", messages=CHAT, max_tokens=6)
        assert time.monotonic() - t0 >= 6 * token_s - 0.01


def test_http_1_1_keeps_the_connection_and_chunks_streams(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    w = start(sim, workloads, "vllm")
    conn = http.client.HTTPConnection("127.0.0.1", w.port, timeout=30)
    try:
        def ask(method: str, path: str, body: Any = None) -> tuple[Any, bytes]:
            if body is None:  # no body at all: neither Content-Length nor Transfer-Encoding
                conn.putrequest(method, path)
                conn.endheaders()
            else:
                conn.request(method, path, json.dumps(body),
                             {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp, resp.read()

        resp, _ = ask("GET", "/v1/models")
        sock = conn.sock
        assert resp.version == 11 and resp.getheader("Content-Length")
        resp, data = ask("POST", "/v1/chat/completions", {"messages": CHAT, "stream": True,
                                                          "max_tokens": 2})
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Type", "").startswith("text/event-stream")
        events = [e for e in data.decode().split("\n\n") if e]
        assert len(events) == 4 and events[-1] == "data: [DONE]", events
        for method, path, code in (("POST", "/sleep", 200), ("GET", "/health", 200),
                                   ("POST", "/v1/chat/completions", 503),
                                   ("POST", "/wake_up", 200)):
            resp, _ = ask(method, path, {"messages": CHAT} if code == 503 else None)
            assert resp.status == code and resp.getheader("Content-Length") is not None
            assert conn.sock is sock, f"{method} {path} closed the connection"
    finally:
        conn.close()


def test_busy_while_a_request_is_in_flight(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    token_s = 0.6
    w = start(sim, workloads, "vllm", "--token-ms", str(token_s * 1000))
    assert util(sim, w.pid) == 0
    with sdk(w) as c:
        stream = c.chat.completions.create(model="m", messages=CHAT, stream=True)
        next(iter(stream))
        assert util(sim, w.pid) == 90  # 11 tokens, 6.6 s, still to come
        stream.close()
        # The client left: the stand-in's second write after that fails and it stops
        # producing, well before the 6.6 s the whole reply would take.
        wait_for(lambda: util(sim, w.pid) == 0, 3 * token_s + SLACK_S, "the stream to stop")

        answered = threading.Event()

        def ask() -> None:
            c.chat.completions.create(model="m", messages=CHAT, max_tokens=2)
            answered.set()

        asker = threading.Thread(target=ask)
        asker.start()
        wait_for(lambda: util(sim, w.pid) == 90 or answered.is_set(), 2 * token_s,
                 "the request to show busy")
        assert not answered.is_set()
        asker.join(10)
        assert answered.is_set() and util(sim, w.pid) == 0  # ended before the answer

    res = call(w.port, "POST", "/sim/busy", {"seconds": 0.5, "util_pct": 40})
    assert res.code == 200 and util(sim, w.pid) == 40
    wait_for(lambda: util(sim, w.pid) == 0, 0.5 + SLACK_S, "the busy period to end")


# -- ComfyUI ---------------------------------------------------------------------------------
def test_comfyui_prompt_history_and_websocket_progress(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    steps, step_s = 4, 0.1
    w = start(sim, workloads, "comfyui", "--steps", str(steps), "--token-ms", str(step_s * 1e3))
    url = f"ws://127.0.0.1:{w.port}/ws?clientId="
    assert call(w.port, "GET", "/ws").code == 400  # not an upgrade
    with connect(url + "abc") as ws, connect(url + "other") as other:
        first = json.loads(ws.recv(timeout=5))
        assert first == {"type": "status", "data": {
            "status": {"exec_info": {"queue_remaining": 0}}, "sid": "abc"}}
        assert json.loads(other.recv(timeout=5))["data"]["sid"] == "other"
        assert ws.ping().wait(5)  # answered with a pong

        queued = call(w.port, "POST", "/prompt", {"prompt": {"3": {}}, "client_id": "abc"})
        assert queued.code == 200 and queued.json()["node_errors"] == {}
        pid = queued.json()["prompt_id"]
        assert call(w.port, "GET", f"/history/{pid}").json() == {}  # runs for 0.4 s

        seen: list[dict[str, Any]] = []
        while not (seen and seen[-1]["type"] == "executing"):
            seen.append(json.loads(ws.recv(timeout=5)))
            if seen[-1]["type"] == "progress" and seen[-1]["data"]["value"] == 1:
                assert util(sim, w.pid) == 90  # busy while the prompt runs
        kinds = [m["type"] for m in seen]
        assert kinds == ["execution_start", *["progress"] * steps, "executed",
                         "execution_success", "executing"], kinds
        assert all(m["data"]["prompt_id"] == pid for m in seen)
        assert [m["data"]["value"] for m in seen if m["type"] == "progress"] == [1, 2, 3, 4]
        assert {(m["data"]["max"], m["data"]["node"]) for m in seen[1:1 + steps]} == {(4, "3")}
        images = seen[-3]["data"]["output"]["images"]
        assert seen[-3]["data"]["node"] == "9" and images[0]["filename"].endswith(".png")
        assert seen[-1]["data"]["node"] is None
        assert util(sim, w.pid) == 0

        # broadcast: the other client saw the same run
        other_kinds = []
        while "executing" not in other_kinds:
            other_kinds.append(json.loads(other.recv(timeout=5))["type"])
        assert other_kinds == kinds

        entry = call(w.port, "GET", f"/history/{pid}").json()[pid]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
        assert entry["outputs"] == {"9": {"images": images}}
        assert entry["prompt"][1:3] == [pid, {"3": {}}]
        ws.close()
        assert ws.close_code == 1000  # the stand-in answered the close frame
    assert call(w.port, "POST", "/prompt", {}).code == 400  # no prompt
