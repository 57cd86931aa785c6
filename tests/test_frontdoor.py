"""The front door on the real daemon, driven by clients nobody here wrote: the `openai` SDK
(sync and async, streamed and not) on `/v1`, `websockets` on `/svc/<name>/ws`, and httpx for
the reverse proxy; the services are stand-ins that speak vLLM's and ComfyUI's APIs on the
simulated GPU.

The root inventory's budget is 23552 MB: two 14000 MB models do not fit together, and a
sleeping one keeps 300 MB (its declared residual is 500).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from gpu_manager.sim.registry import SimRegistry
from tests.support.daemon import DaemonProc, Sampler
from tests.support.env import free_port, wait_for
from tests.support.served import served

CHAT = [{"role": "user", "content": "hello"}]


def two_models(tmp: Path, **kw: Any) -> tuple[DaemonProc, int, int]:
    pa, pb = free_port(), free_port()
    extra = served("llm-a", pa, "model-a", **kw) + served("llm-b", pb, "model-b", **kw)
    return DaemonProc(tmp, extra_services=extra).start(), pa, pb


def ops_of(d: DaemonProc, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    ops = d.get("/gpu/operations", params={"limit": 200}).json()["operations"]
    return [o for o in ops if o["request"]["kind"] == kind
            and (name is None or o["request"].get("name") == name)]


def serve_of(d: DaemonProc, name: str) -> dict[str, Any]:
    out: dict[str, Any] = d.status()["services"][name]
    return out


@pytest.fixture
def daemon2(tmp_path: Path) -> Iterator[tuple[DaemonProc, int, int]]:
    d, pa, pb = two_models(tmp_path, token_ms=40)
    try:
        yield d, pa, pb
    finally:
        d.close()


async def test_a_request_starts_a_stopped_model_and_wakes_a_sleeping_one(
        daemon2: tuple[DaemonProc, int, int]) -> None:
    d, _, _ = daemon2
    client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0)
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert listed["model-a"] == {"service": "llm-a", "state": "stopped"}

    # cold start: the first request starts it, through the planner, as its own kind
    reply = client.chat.completions.create(model="model-a", messages=CHAT, max_tokens=3)
    assert reply.choices[0].message.content.startswith("Hello from llm-a")
    assert reply.model == "model-a"
    started = ops_of(d, "RequestStart", "llm-a")
    assert [o["status"] for o in started] == ["succeeded"]
    assert started[0]["request"]["reason"] == "request"
    svc = serve_of(d, "llm-a")
    assert svc["state"] == "ready" and svc["serve"]["request_starts"] == 1
    pid = svc["pids"][0]

    # the other entrances of the same server
    assert client.completions.create(model="model-a", prompt="hi", max_tokens=2).choices
    assert len(client.embeddings.create(model="model-a", input="hi").data[0].embedding) > 0

    # streamed, passed through as it comes: the first token long before the last
    t0 = time.monotonic()
    arrivals = []
    for chunk in client.chat.completions.create(model="model-a", messages=CHAT, max_tokens=8,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 8
    assert arrivals[-1] - arrivals[0] > 0.2, arrivals  # 40 ms a token, not one lump

    # asleep: the next request wakes it (same process, no cold start), with the async client
    assert d.post("/gpu/service/llm-a/sleep").status_code == 200
    aclient = openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0)
    stream = await aclient.chat.completions.create(model="model-a", messages=CHAT,
                                                   max_tokens=4, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("Hello from llm-a")
    await aclient.close()
    svc = serve_of(d, "llm-a")
    assert svc["state"] == "ready" and svc["pids"] == [pid] and svc["wakes"] == 1
    assert svc["serve"]["request_starts"] == 2

    # what an operator sees
    cli = subprocess.run([str(Path(sys.executable).with_name("gpu-manager")), "models",
                          "--url", d.url], capture_output=True, text=True, timeout=30,
                         check=False)
    assert cli.returncode == 0, cli.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in cli.stdout.splitlines()[1:]}
    assert rows == {"model-a": ["llm-a", "ready"], "model-b": ["llm-b", "stopped"]}

    # a model nobody serves: OpenAI's 404, naming the served ones
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=CHAT)
    assert "model-a, model-b" in str(err.value)
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_two_models_that_do_not_fit_take_turns_by_sleep_and_wake(tmp_path: Path) -> None:
    """Two clients, one per model, for 30 s: every switch is a sleep and a wake (the pids
    never change), no answer is an error, and the simulated GPU never over-commits."""
    d, _, _ = two_models(tmp_path, token_ms=1)
    sampler = Sampler(d.sim_dir, 24576)
    answers: dict[str, list[int]] = {"model-a": [], "model-b": []}
    errors: list[str] = []
    until = time.monotonic() + 30

    def client(model: str) -> None:
        c = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0,
                          timeout=60)
        while time.monotonic() < until:
            try:
                r = c.chat.completions.create(model=model, messages=CHAT, max_tokens=4)
                answers[model].append(len(r.choices[0].message.content or ""))
            except openai.APIError as exc:
                errors.append(f"{model}: {exc}")

    try:
        threads = [threading.Thread(target=client, args=(m,)) for m in answers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        sampler.stop()
        assert not errors, errors[:5]
        assert min(len(a) for a in answers.values()) >= 5, {k: len(v) for k, v in
                                                             answers.items()}
        assert sampler.max_used <= 24576 - 1024, sampler.max_used
        assert not (d.sim_dir / "oom.jsonl").exists() or not (
            d.sim_dir / "oom.jsonl").read_text().strip()
        status = d.status()["services"]
        for name in ("llm-a", "llm-b"):
            # one process each, ever: switches were sleeps and wakes, not cold starts
            assert len(sampler.by_name(name)) == 1, sampler.by_name(name)
            assert status[name]["sleeps"] >= 2 and status[name]["wakes"] >= 2
    finally:
        sampler.stop()
        d.close()


async def test_fifty_concurrent_requests_for_a_stopped_model_start_it_once(
        daemon2: tuple[DaemonProc, int, int]) -> None:
    d, _, _ = daemon2
    client = openai.AsyncOpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0,
                                timeout=60)
    replies = await asyncio.gather(*(
        client.chat.completions.create(model="model-b", messages=CHAT, max_tokens=2)
        for _ in range(50)))
    await client.close()
    assert all((r.choices[0].message.content or "").startswith("Hello") for r in replies)
    assert len(ops_of(d, "RequestStart", "llm-b")) == 1
    assert serve_of(d, "llm-b")["serve"]["request_starts"] == 1
    assert len(SimRegistry(d.sim_dir).active()) == 1  # one llm-b process, nothing else


def test_a_higher_priority_start_drains_the_requests_in_flight_then_cuts(
        tmp_path: Path) -> None:
    """comfyui (priority 100, 20000 MB) needs llm-a's room. A short stream in flight
    finishes; a long one is cut after drain_s with a clean error the SDK raises."""
    port = free_port()
    # the stand-in's reply is 11 tokens: 4.4 s at 400 ms a token
    d = DaemonProc(tmp_path, extra_services=served("llm-a", port, "model-a", token_ms=400,
                                                   serve_extra="drain_s: 2")).start()
    try:
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model="model-a", messages=CHAT, max_tokens=1)
        outcome: dict[str, Any] = {}

        def stream(key: str, tokens: int) -> None:
            got: list[str] = []
            try:
                for c in client.chat.completions.create(model="model-a", messages=CHAT,
                                                        max_tokens=tokens, stream=True):
                    if c.choices and c.choices[0].delta.content:
                        got.append(c.choices[0].delta.content)
                outcome[key] = ("done", len(got))
            except openai.APIError as exc:
                outcome[key] = ("error", len(got), str(exc))

        threads = [threading.Thread(target=stream, args=("short", 2)),
                   threading.Thread(target=stream, args=("long", 100))]
        for t in threads:
            t.start()
        wait_for(lambda: serve_of(d, "llm-a")["serve"]["in_flight"] == 2, 10,
                 "two requests in flight")
        t0 = time.monotonic()
        r = d.post("/gpu/service/comfyui/start")
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
        assert r.status_code == 200, r.text
        step = next(s for s in r.json()["plan"]["steps"] if s["service"] == "llm-a")
        assert "drained 1 request(s) in flight, cut 1 after 2s" in step["detail"]
        assert 1.9 <= took < 10, took
        assert outcome["short"] == ("done", 2)
        assert outcome["long"][0] == "error" and "cut" in outcome["long"][2]
        assert 1 <= outcome["long"][1] < 11
        assert serve_of(d, "llm-a")["serve"]["cut"] == 1
    finally:
        d.close()


def test_idle_release_is_by_measure_not_by_the_clock(tmp_path: Path) -> None:
    """idle after 1.5 s without requests AND below 5 % utilisation: computing that does
    not pass through the front door (/sim/busy) keeps it; then it sleeps by itself."""
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=served(
        "llm-a", port, "model-a", serve_extra="idle: {after_s: 1.5, below_util_pct: 5}")).start()
    try:
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model="model-a", messages=CHAT, max_tokens=1)
        busy = httpx.post(f"http://127.0.0.1:{port}/sim/busy",
                          json={"seconds": 5, "util_pct": 60}, trust_env=False)
        assert busy.status_code == 200
        busy_until = busy.json()["busy_until"]
        wait_for(lambda: (serve_of(d, "llm-a")["serve"]["idle"] or {}).get("util_pct") == 60,
                 5, "the utilisation in status")
        idle = serve_of(d, "llm-a")["serve"]["idle"]
        assert idle["util_source"] == "process"
        while time.time() < busy_until - 0.2:  # an absence: watched all through the window
            assert serve_of(d, "llm-a")["state"] == "ready", "released while computing"
            time.sleep(0.1)
        wait_for(lambda: serve_of(d, "llm-a")["state"] == "sleeping", 10, "the idle release")
        assert time.time() >= busy_until + 1.0  # not before after_s of quiet
        wait_for(lambda: [o["status"] for o in ops_of(d, "IdleSleep", "llm-a")] == [
            "succeeded"], 10, "the idle release to be one operation that succeeded")
        # and the next request wakes it again
        client.chat.completions.create(model="model-a", messages=CHAT, max_tokens=1)
        assert serve_of(d, "llm-a")["state"] == "ready"
    finally:
        d.close()


def test_a_client_that_goes_away_mid_stream_frees_its_slot(tmp_path: Path) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=served(
        "llm-a", port, "model-a", token_ms=100,
        serve_extra="max_concurrent: 1\nqueue: {max: 1, timeout_s: 1}")).start()
    try:
        body = {"model": "model-a", "messages": CHAT, "max_tokens": 300, "stream": True}
        with httpx.Client(base_url=d.url, trust_env=False, timeout=30) as h:
            with h.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                assert serve_of(d, "llm-a")["serve"]["in_flight"] == 1
                # the one slot is taken: one more waits (then times out: 503), the next
                # finds the queue full (429), both with Retry-After
                waiting = threading.Thread(target=lambda: outcome.update(
                    r=h.post("/v1/chat/completions", json={**body, "stream": False})))
                outcome: dict[str, httpx.Response] = {}
                waiting.start()
                wait_for(lambda: serve_of(d, "llm-a")["serve"]["waiting"] == 1, 5, "a waiter")
                full = h.post("/v1/chat/completions", json=body)
                assert full.status_code == 429 and full.headers["retry-after"]
                assert full.json()["error"]["code"] == "queue_full"
                waiting.join(10)
                assert outcome["r"].status_code == 503 and outcome["r"].headers["retry-after"]
            # left the stream after one chunk of 300: the slot is free long before 30 s
            wait_for(lambda: serve_of(d, "llm-a")["serve"]["in_flight"] == 0, 3,
                     "the slot given back")
        metrics = httpx.get(f"{d.url}/metrics", trust_env=False).text
        assert 'gpu_manager_frontdoor_requests_total{code="gone",service="llm-a"} 1.0' \
            in metrics
    finally:
        d.close()


class _Echo(BaseHTTPRequestHandler):
    """An upstream that answers a chat completion and remembers the headers it got."""

    seen: list[dict[str, str]] = []
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        data = json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                           "model": "echo", "choices": [{"index": 0, "finish_reason": "stop",
                           "message": {"role": "assistant", "content": "ok"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: Any) -> None:
        pass


def test_the_token_guards_the_front_door_and_never_reaches_the_upstream(
        tmp_path: Path) -> None:
    echo = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    port = free_port()
    d = DaemonProc(tmp_path, token="front-secret", env={"ECHO_KEY": "upstream-secret"},
                   extra_services=served("echo", port, "echo", vram=1000,
                                         serve_port=echo.server_address[1],
                                         serve_extra="api_key_env: ECHO_KEY")).start()
    try:
        anonymous = openai.OpenAI(base_url=f"{d.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.chat.completions.create(model="echo", messages=CHAT)
        assert httpx.post(f"{d.url}/svc/echo/x", json={}, trust_env=False).status_code == 401
        assert not _Echo.seen
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="front-secret", max_retries=0)
        r = client.chat.completions.create(model="echo", messages=CHAT)
        assert r.choices[0].message.content == "ok"
        got = httpx.post(f"{d.url}/svc/echo/anything?x=1", json={"a": 1}, trust_env=False,
                         headers={"Authorization": "Bearer front-secret"})
        assert got.status_code == 200
        assert len(_Echo.seen) == 2
        for headers in _Echo.seen:
            assert headers["authorization"] == "Bearer upstream-secret"
            assert "front-secret" not in json.dumps(headers)
    finally:
        d.close()
        echo.shutdown()
        echo.server_close()


COMFY = """
  comfy:
    type: native
    vram_mb: 6000
    priority: 20
    command: ["{{python}}", "-m", "gpu_manager.sim.workload", "--name", "comfy",
              "--vram-mb", "6000", "--port", "{port}", "--startup-s", "0.3", "--api", "comfyui",
              "--token-ms", "30", "--steps", "4"]
    health: {{url: "http://127.0.0.1:{port}/health", timeout_s: 2, interval_s: 1}}
    start_timeout_s: 20
    stop_timeout_s: 5
    serve: {{url: "http://127.0.0.1:{port}"}}
"""


def test_comfyui_through_svc_with_its_websocket_progress(tmp_path: Path) -> None:
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=COMFY.format(port=port)).start()
    ws_url = d.url.replace("http", "ws") + "/svc/comfy/ws?clientId=t1"
    try:
        # a page from another site may not open it (browsers apply no same-origin policy
        # to WebSockets)
        with pytest.raises(InvalidStatus):
            connect(ws_url, origin="http://evil.example", open_timeout=10)  # type: ignore[arg-type]
        assert d.states()["comfy"] == "stopped"
        with connect(ws_url, open_timeout=30) as ws:  # connecting starts it
            first = json.loads(ws.recv(timeout=10))
            assert first["type"] == "status"
            r = httpx.post(f"{d.url}/svc/comfy/prompt", trust_env=False, timeout=30,
                           json={"prompt": {"3": {"class_type": "KSampler"}}, "client_id": "t1"})
            assert r.status_code == 200, r.text
            prompt_id = r.json()["prompt_id"]
            kinds = []
            while "executed" not in kinds:
                msg = json.loads(ws.recv(timeout=10))
                if msg["data"].get("prompt_id") == prompt_id:
                    kinds.append(msg["type"])
            assert kinds.count("progress") == 4
        history = httpx.get(f"{d.url}/svc/comfy/history/{prompt_id}", trust_env=False).json()
        assert history[prompt_id]["status"]["completed"] is True
        assert serve_of(d, "comfy")["serve"]["request_starts"] == 1
    finally:
        d.close()


def test_a_client_that_gives_up_while_waiting_frees_its_place(tmp_path: Path) -> None:
    """A request waiting for a slow start is dropped when its client leaves: its queue
    place is freed at once, and nothing is forwarded for it."""
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=served("llm-a", port, "model-a", startup=3)).start()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{d.url}/v1/chat/completions", trust_env=False, timeout=1.0,
                       json={"model": "model-a", "messages": CHAT, "max_tokens": 1})
        wait_for(lambda: serve_of(d, "llm-a")["serve"]["waiting"] == 0, 1.5,
                 "the place given back before the start ends")
        assert serve_of(d, "llm-a")["state"] == "starting"  # the start goes on for the next
        wait_for(lambda: serve_of(d, "llm-a")["state"] == "ready", 20, "the start")
        metrics = httpx.get(f"{d.url}/metrics", trust_env=False).text
        assert 'gpu_manager_frontdoor_requests_total{code="gone",service="llm-a"} 1.0' \
            in metrics
    finally:
        d.close()


class _Dies(BaseHTTPRequestHandler):
    """An upstream that starts its answer and dies halfway (the connection drops)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        sse = self.path.endswith("/chat/completions")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream" if sse else "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        first = (b'data: {"id": "x", "object": "chat.completion.chunk", "created": 0, '
                 b'"model": "m", "choices": [{"index": 0, "delta": {"content": "a"}, '
                 b'"finish_reason": null}]}\n\n') if sse else b"first part"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(first), first))
        self.wfile.flush()
        self.close_connection = True  # and no last chunk: a server that died

    def log_message(self, *_: Any) -> None:
        pass


def test_an_upstream_that_dies_mid_answer_is_a_truncation_never_a_clean_end(
        tmp_path: Path) -> None:
    dies = ThreadingHTTPServer(("127.0.0.1", 0), _Dies)
    threading.Thread(target=dies.serve_forever, daemon=True).start()
    d = DaemonProc(tmp_path, extra_services=served(
        "dies", free_port(), "dies", vram=1000, serve_port=dies.server_address[1])).start()
    try:
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0)
        got = []
        with pytest.raises(openai.APIError) as err:
            for chunk in client.chat.completions.create(model="dies", messages=CHAT,
                                                        stream=True):
                got.append(chunk.choices[0].delta.content)
        assert got == ["a"] and "dies" in str(err.value)
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(f"{d.url}/svc/dies/raw", json={}, trust_env=False, timeout=10)
        metrics = httpx.get(f"{d.url}/metrics", trust_env=False).text
        assert 'gpu_manager_frontdoor_requests_total{code="cut",service="dies"} 2.0' in metrics
        assert serve_of(d, "dies")["serve"]["in_flight"] == 0
    finally:
        d.close()
        dies.shutdown()
        dies.server_close()


def test_a_page_of_another_site_may_not_start_a_service(tmp_path: Path) -> None:
    """A cross-site GET (an image, a link) reads through a running service, but a stopped
    one is not started for it: that would preempt others on a visitor's behalf."""
    port = free_port()
    d = DaemonProc(tmp_path, extra_services=COMFY.format(port=port)).start()
    try:
        foreign = {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}
        r = httpx.get(f"{d.url}/svc/comfy/system_stats", headers=foreign, trust_env=False)
        assert r.status_code == 403 and r.json()["error"] == "cross_origin"
        assert d.states()["comfy"] == "stopped"
        own = httpx.get(f"{d.url}/svc/comfy/system_stats", trust_env=False, timeout=30)
        assert own.status_code == 200  # no Origin (curl, an SDK): started for it
        r = httpx.get(f"{d.url}/svc/comfy/system_stats", headers=foreign, trust_env=False)
        assert r.status_code == 200  # running: read through
    finally:
        d.close()
