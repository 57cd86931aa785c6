"""What llama.cpp's real server does to the front door (tests/test_real_llama.py), made
deterministic here with upstreams that always do it:
- an OpenAI event stream that ends properly but without `data: [DONE]` (a streamed prompt
  beyond its context) is incomplete: the door says so with an `error` event, so that the SDK
  raises instead of handing over a short (or empty) answer as if whole;
- a kept-alive connection closed by the server just as the next request goes out on it (it
  closes one after an error inside a stream it had already ended): the door sends the
  request once more on a fresh connection instead of answering 502."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gpu_manager.frontdoor.relay import DONE_MARK, DoneWatch
from tests.support.daemon import DaemonProc
from tests.support.env import free_port
from tests.support.served import served

CHAT = [{"role": "user", "content": "hello"}]
CHUNK = (b'data: {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", '
         b'"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": null}]}\n\n')


class _EndsEarly(BaseHTTPRequestHandler):
    """Streams one token, then ends the body properly (the last chunk), with no [DONE]; on
    `/v1/embeddings` an event stream with no promise of [DONE] (passed through as is)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHUNK), CHUNK))
        self.wfile.flush()

    def log_message(self, *_: Any) -> None:
        pass


class _ClosesFresh(BaseHTTPRequestHandler):
    """Reads each request and closes its connection unanswered: a server that got the
    request (and may have acted on it) and died before answering."""

    protocol_version = "HTTP/1.1"
    requests: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.requests.append(self.path)
        self.close_connection = True

    def log_message(self, *_: Any) -> None:
        pass


class _ClosesKeptAlive(BaseHTTPRequestHandler):
    """Answers the first request of each connection, and closes the connection, unanswered,
    when a second one comes on it: the race of a server closing an idle connection."""

    protocol_version = "HTTP/1.1"
    requests: list[int] = []  # the connections' ports, for the test

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        port = self.client_address[1]
        again = port in self.requests
        self.requests.append(port)
        if again:
            self.close_connection = True
            return
        body = b'{"id": "x", "object": "embedding"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def test_done_is_seen_whatever_the_chunking() -> None:
    body = CHUNK + DONE_MARK + b"\n\n"
    for cut in range(1, len(body)):
        watch = DoneWatch()
        for part in (body[:cut], body[cut:]):
            watch.feed(part)
        assert watch.seen, cut
    watch = DoneWatch()
    for byte in range(len(CHUNK)):
        watch.feed(CHUNK[byte:byte + 1])
    assert not watch.seen
    # SSE lets the space after `data:` go; only the last event is the end: `[DONE]` quoted
    # in a token, or an event after it, is no end
    for body, ends in ((CHUNK + b"data:[DONE]\n\n", True),
                       (CHUNK.replace(b'"a"', b'"data: [DONE]"'), False),
                       (DONE_MARK + b"\n\n" + CHUNK, False)):
        watch = DoneWatch()
        watch.feed(body)
        assert watch.seen is ends, body


def test_a_stream_that_ends_without_done_is_an_error_to_the_sdk(tmp_path: Path) -> None:
    early = ThreadingHTTPServer(("127.0.0.1", 0), _EndsEarly)
    threading.Thread(target=early.serve_forever, daemon=True).start()
    d = DaemonProc(tmp_path, extra_services=served(
        "early", free_port(), "early", vram=1000, serve_port=early.server_address[1])).start()
    try:
        client = openai.OpenAI(base_url=f"{d.url}/v1", api_key="x", max_retries=0, timeout=30)
        got = []
        with pytest.raises(openai.APIError, match="without its end"):
            for chunk in client.chat.completions.create(model="early", messages=CHAT,
                                                        stream=True):
                got.append(chunk.choices[0].delta.content)
        assert got == ["a"]  # what came is relayed as it came; then the error
        # a route that promises no [DONE]: relayed as it ends
        raw = httpx.post(f"{d.url}/v1/embeddings", json={"model": "early", "input": "x"},
                         trust_env=False, timeout=30)
        assert raw.status_code == 200 and raw.content == CHUNK
        metrics = httpx.get(f"{d.url}/metrics", trust_env=False).text
        assert 'gpu_manager_frontdoor_requests_total{code="cut",service="early"} 1.0' \
            in metrics
    finally:
        d.close()
        early.shutdown()
        early.server_close()


def test_a_kept_alive_connection_closed_under_a_request_is_tried_once_more(
        tmp_path: Path) -> None:
    closes = ThreadingHTTPServer(("127.0.0.1", 0), _ClosesKeptAlive)
    threading.Thread(target=closes.serve_forever, daemon=True).start()
    d = DaemonProc(tmp_path, extra_services=served(
        "closes", free_port(), "closes", vram=1000, serve_port=closes.server_address[1])).start()
    _ClosesKeptAlive.requests = []
    try:
        for _ in range(3):
            r = httpx.post(f"{d.url}/v1/embeddings", json={"model": "closes", "input": "x"},
                           trust_env=False, timeout=30)
            assert r.status_code == 200, r.text
        ports = _ClosesKeptAlive.requests
        # each later request went out on the kept-alive connection first, then on a new one
        assert len(ports) == 5 and len(set(ports)) == 3, ports
        # not through /svc: a request there, on the same kept-alive connection, is never
        # sent twice: 502, sent once; the next goes on a fresh connection and is answered
        r = httpx.post(f"{d.url}/svc/closes/v1/embeddings", json={"input": "x"},
                       trust_env=False, timeout=30)
        assert r.status_code == 502, r.text
        assert len(ports) == 6, ports
        r = httpx.post(f"{d.url}/svc/closes/v1/embeddings", json={"input": "x"},
                       trust_env=False, timeout=30)
        assert r.status_code == 200, r.text
        assert len(ports) == 7, ports
    finally:
        d.close()
        closes.shutdown()
        closes.server_close()


def test_a_request_closed_unanswered_on_a_fresh_connection_is_not_sent_again(
        tmp_path: Path) -> None:
    """The server got it and closed without an answer: it may have acted on it, so the door
    answers 502 rather than send it twice."""
    fresh = ThreadingHTTPServer(("127.0.0.1", 0), _ClosesFresh)
    threading.Thread(target=fresh.serve_forever, daemon=True).start()
    d = DaemonProc(tmp_path, extra_services=served(
        "fresh", free_port(), "fresh", vram=1000, serve_port=fresh.server_address[1])).start()
    _ClosesFresh.requests = []
    try:
        r = httpx.post(f"{d.url}/v1/embeddings", json={"model": "fresh", "input": "x"},
                       trust_env=False, timeout=30)
        assert r.status_code == 502, r.text
        assert _ClosesFresh.requests == ["/v1/embeddings"]  # once
    finally:
        d.close()
        fresh.shutdown()
        fresh.server_close()
