"""The stand-ins' OpenAI routes read with the official openai SDK, their HTTP/1.1 and busy
accounting, and ComfyUI's prompt, history and /ws with the websockets client."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from websockets.sync.client import connect

from gpu_manager.probe import SimulatedProbe
from tests.support.env import wait_for
from tests.support.standins import (
    KINDS,
    SLACK_S,
    call,
    do,
    put_to_sleep,
    start,
)
from tests.support.workloads import Workload

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
        # the role alone first (as the real servers send it), a chunk a token, the finish
        assert [ch.choices[0].delta.role for ch in chunks] == ["assistant"] + [None] * 13
        assert chunks[0].choices[0].delta.content is None
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
        assert [ch.choices[0].finish_reason for ch in chunks] == [None] * 13 + ["stop"]

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
        assert len(events) == 5 and events[-1] == "data: [DONE]", events  # role, 2, end
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


def test_a_prompt_beyond_the_context_is_the_servers_400_streamed_or_not(
    sim: SimulatedProbe, workloads: list[Workload]
) -> None:
    """What llama.cpp's real server answered (tests/test_real_llama.py): 400 with OpenAI's
    `context_length_exceeded`; the stand-in says it before any stream, as vLLM does."""
    w = start(sim, workloads, "vllm", "--context-tokens", "10")
    long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "w " * 8}]
    with sdk(w) as c:
        assert c.chat.completions.create(model="m", messages=long, max_tokens=2).choices
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                c.chat.completions.create(model="m", messages=long, max_tokens=3,
                                          stream=stream)
            assert err.value.code == "context_length_exceeded"
            assert "maximum context length is 10 tokens" in err.value.message
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="m", prompt="w " * 10)  # the prompt alone fills it
