"""Forward one admitted request upstream and relay the answer as it comes, never buffered.

Everything runs in the request's own task, inside one try/finally, so the slot is given back
and the upstream response closed whatever happens: the answer ends, the upstream fails, the
client goes away (a `ClientWatch` hears `http.disconnect` once the body is read and cuts the
slot), or a release cuts it after `drain_s` (the task is cancelled with the slot's reason;
the relay takes the cancel back and ends the answer cleanly: a JSON error before the first
byte, an SSE `error` event in an event stream, else the body ends short).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from loguru import logger
from starlette.types import Message, Receive, Send

from gpu_manager.aio import retrieve
from gpu_manager.config.serve import ServeConfig
from gpu_manager.frontdoor.errors import DoorError
from gpu_manager.frontdoor.gate import Slot
from gpu_manager.frontdoor.stats import DoorStats

GONE = "the client went away"


class AnswerCut(RuntimeError):
    """An answer already under way could not be finished: raised so the server drops the
    connection and the client sees a truncation, never a clean end."""


class ClientWatch:
    """Listens for the client leaving while its request waits and while it is relayed (the
    body must have been read: the next message can only be `http.disconnect`). Gone while
    waiting: the waiting task is cancelled (its queue place freed, no start for nobody);
    gone while relayed: its slot is cut (the upstream request is dropped)."""

    def __init__(self, receive: Receive, task: asyncio.Task[object],
                 ready: asyncio.Event | None = None) -> None:
        self.receive, self.task = receive, task
        self.slot: Slot | None = None
        self.gone = False
        self._ready = ready
        self._watch = asyncio.create_task(self._run(), name="client-watch")
        # a receive() that fails (the server's side of a broken connection) ends it; seen,
        # never "exception never retrieved"
        self._watch.add_done_callback(retrieve)

    async def _run(self) -> None:
        if self._ready is not None:
            await self._ready.wait()  # a body streamed up: not before it is all read
        while True:
            msg: Message = await self.receive()
            if msg["type"] == "http.disconnect":
                self.gone = True
                if self.slot is not None:
                    self.slot.cut(GONE)
                else:
                    self.task.cancel(GONE)
                return

    def admitted(self, slot: Slot) -> None:
        self.slot = slot
        if self.gone and slot.cut_reason is None:
            slot.cut_reason = GONE  # the task's cancel is asked for already: not twice

    def close(self) -> None:
        self._watch.cancel()


# Not forwarded: hop-by-hop headers (RFC 9110 7.6.1), the client's credentials for the
# daemon (never the upstream's business), and what httpx or the server set themselves.
DROP_UP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "host", "authorization", "x-service-token",
    "cookie", "expect"})
DROP_DOWN = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "server", "date"})


def up_headers(raw: list[tuple[bytes, bytes]], cfg: ServeConfig) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in raw if k.decode("latin-1").lower() not in DROP_UP]
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if key:
        out.append((b"authorization", f"Bearer {key}".encode()))
    return out


@dataclass
class Upstream:
    """What to send: method, URL, headers, and the body (bytes, or a stream read from the
    client as it arrives)."""

    method: str
    url: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | None  # None: stream it from `receive`


class Relay:
    def __init__(self, client: httpx.AsyncClient, stats: DoorStats, name: str,
                 cfg: ServeConfig, slot: Slot, up: Upstream, openai: bool,
                 max_body: int, watch: ClientWatch | None = None) -> None:
        self.client, self.stats, self.name, self.cfg = client, stats, name, cfg
        self.max_body = max_body
        self.watch = watch  # the one listening since the request came (its body read)
        self.slot, self.up, self.openai = slot, up, openai
        self.body_sent = asyncio.Event()
        self.started = False  # the answer's head went to the client
        self.sse = False

    async def _body(self, receive: Receive) -> AsyncIterator[bytes]:
        """The client's body, streamed up as it arrives (counted: over the limit, 413)."""
        size = 0
        try:
            while True:
                try:  # a client that stops sending its body holds a slot: not for ever
                    async with asyncio.timeout(self.cfg.chunk_timeout_s):
                        msg = await receive()
                except TimeoutError:
                    raise DoorError(408, "request_timeout", "the request body stopped "
                                    f"arriving for {self.cfg.chunk_timeout_s:g}s "
                                    "(serve.chunk_timeout_s)") from None
                if msg["type"] == "http.disconnect":
                    self.slot.cut(GONE)
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise DoorError(413, "payload_too_large", "the request body is larger than "
                                    f"{self.max_body} bytes (GPU_MANAGER_PROXY_MAX_BODY_BYTES)")
                if chunk:
                    yield chunk
                if not msg.get("more_body", False):
                    return
        finally:
            self.body_sent.set()

    async def __call__(self, receive: Receive, send: Send) -> None:
        t0 = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        up, cfg = self.up, self.cfg
        if up.body is not None:
            self.body_sent.set()
        watcher = self.watch or ClientWatch(receive, task, self.body_sent)
        watcher.admitted(self.slot)
        response: httpx.Response | None = None
        code = "5xx"
        try:
            try:
                response = await self._open(receive)
                head = [(k, v) for k, v in response.headers.raw
                        if k.decode("latin-1").lower() not in DROP_DOWN]
                self.sse = response.headers.get("content-type", "").startswith(
                    "text/event-stream")
                code = f"{response.status_code // 100}xx"
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": head})
                self.started = True
                done = DoneWatch() if self.sse and self.openai and ends_with_done(
                    up.url, response) else None
                async for chunk in response.aiter_raw():
                    if done is not None:
                        done.feed(chunk)
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                self.slot.finishing = True  # a disconnect seen from here on cuts nothing
                if done is not None and not done.seen:
                    # The upstream ended its stream properly, but before its end marker:
                    # llama.cpp's server does, for a streamed prompt beyond its context (200,
                    # then an empty stream). Relayed as is, the SDK would take the answer for
                    # whole, or empty: a silent truncation. An error event says otherwise.
                    code = "cut"
                    await self._end(send, DoorError(
                        502, "upstream_truncated", f"{self.name} ended the stream without "
                        "its end (data: [DONE]): the answer is incomplete"))
                    return
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except asyncio.CancelledError:
                if self.slot.cut_reason is None:
                    raise  # not ours: the server is going down
                self.slot.finishing = True  # one cut is enough
                task.uncancel()
                code = "gone" if self.slot.cut_reason == GONE else "cut"
                await self._end(send, DoorError(
                    503, "service_released", f"the request was cut: {self.slot.cut_reason}",
                    retry_after=2))
            except DoorError as err:  # the body went over the limit on its way up
                self.slot.finishing = True
                code = "cut" if self.started else f"{err.status // 100}xx"
                await self._end(send, err)
            except httpx.TimeoutException as exc:
                self.slot.finishing = True
                code = "cut" if self.started else "5xx"
                await self._end(send, DoorError(
                    504, "upstream_timeout", f"{self.name} did not answer in time "
                    f"({type(exc).__name__}; serve.connect_timeout_s "
                    f"{cfg.connect_timeout_s:g}, chunk_timeout_s {cfg.chunk_timeout_s:g})"))
            except httpx.HTTPError as exc:
                self.slot.finishing = True
                code = "cut" if self.started else "5xx"
                await self._end(send, DoorError(
                    502, "upstream_unreachable", f"{self.name} at {cfg.url}: "
                    f"{type(exc).__name__}: {exc}", retry_after=2))
        finally:
            self.slot.finishing = True
            watcher.close()
            if response is not None:
                await _close(response)
            self.slot.release()
            self.stats.answered(self.name, code, time.monotonic() - t0)

    async def _open(self, receive: Receive) -> httpx.Response:
        """Send the request upstream; the answer's head.

        Resent once, narrowly: llama.cpp's server closes a kept-alive connection a moment
        after an error raised inside an event stream it had already ended, so the next
        request sent on that pooled connection meets the close instead of an answer. Only
        that race is resent: a `/v1` request whose body we hold, that went out on a reused
        connection (never a fresh one: a server that closes a new connection unanswered
        did get the request), and met a close or a reset before its answer began, or a
        failed write, within RACE_S of being sent (a server that worked on it takes
        longer). Outside that race, a request that may have been acted on is not sent
        twice; inside it, one the server received and acted on within RACE_S and then
        dropped its connection for would be (a crash so soon after: its resend meets the
        dead server)."""
        up, cfg = self.up, self.cfg
        timeout = httpx.Timeout(connect=cfg.connect_timeout_s, read=cfg.chunk_timeout_s,
                                write=cfg.chunk_timeout_s, pool=cfg.connect_timeout_s)
        for retry in (False, True):
            fresh: list[str] = []  # a new connection's events: not the idle-close race
            request = self.client.build_request(
                up.method, up.url, headers=up.headers, timeout=timeout,
                content=up.body if up.body is not None else self._body(receive),
                extensions={"trace": functools.partial(_connects, fresh)})
            sent = time.monotonic()
            try:
                return await self.client.send(request, stream=True)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                # a reset, a failed write, or a close with no byte of answer; not a
                # malformed answer (a server that answered, badly)
                unanswered = not isinstance(exc, httpx.RemoteProtocolError) or \
                    "without sending a response" in str(exc)
                if retry or up.body is None or not self.openai or fresh or not unanswered \
                        or time.monotonic() - sent > RACE_S:
                    raise
                logger.info(f"{self.name}: the kept-alive connection closed under the request "
                            f"({type(exc).__name__}: {exc}); sending it once more")
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _end(self, send: Send, err: DoorError) -> None:
        """End the answer with `err`: whole when nothing was sent, else as the stream allows."""
        if self.slot.cut_reason == GONE:
            return  # nobody to tell
        try:
            if not self.started:
                await err.send(send, self.openai)
                return
            if not self.sse:
                # a body cut short must not look whole to the client: the connection is
                # dropped without the last chunk (the server logs the exception once)
                raise AnswerCut(f"{self.name}: the answer was cut short ({err.message})")
            # an event stream ends with an error event, what OpenAI-compatible servers send
            # when a stream fails (the SDKs raise it)
            event = {"error": {"message": err.message, "type": "server_error",
                               "code": err.code}}
            await send({"type": "http.response.body",
                        "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the connection went with it


# OpenAI's streamed answers end with this event; only these routes promise it (the
# Responses API, say, ends with an event of its own).
DONE_ROUTES = ("/chat/completions", "/completions")
DONE_MARK = b"data: [DONE]"
DONE_LINE = re.compile(rb"data: ?\[DONE\]")
TAIL = 64  # bytes of a stream's end kept: its last line is shorter
# The idle-close race: a close that meets a request this soon after it was sent is the
# server's close of an idle connection, not an answer it failed (see `_open`).
RACE_S = 0.5


def ends_with_done(url: str, response: httpx.Response) -> bool:
    """Whether this 2xx event stream from the upstream must end with `data: [DONE]` (and we
    can see it: a compressed body is relayed as is, unread)."""
    return (response.is_success and "content-encoding" not in response.headers
            and urllib.parse.urlsplit(url).path.endswith(DONE_ROUTES))


class DoneWatch:
    """Whether a relayed stream ended with the `data: [DONE]` event, whatever the chunking:
    only the stream's tail is kept (a few bytes a chunk, no copy of the chunk), and only
    its last event counts (`[DONE]` quoted inside a token is no end; SSE allows the space
    after `data:` to be left out)."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self._tail = (self._tail + chunk[-TAIL:])[-TAIL:]

    @property
    def seen(self) -> bool:
        return DONE_LINE.fullmatch(self._tail.rstrip().rsplit(b"\n", 1)[-1].strip()) \
            is not None


async def _connects(seen: list[str], event: str, _info: dict[str, object]) -> None:
    """httpcore's trace hook: note the events of a new connection being opened."""
    if event.startswith("connection.connect_tcp"):
        seen.append(event)


async def _close(response: httpx.Response) -> None:
    """Close the upstream answer (a cut one: the connection is dropped, so the server sees
    its client go); bounded, and never cancelled halfway by our own cancel."""
    closing = asyncio.ensure_future(response.aclose())
    try:
        async with asyncio.timeout(2.0):
            await asyncio.shield(closing)
    except (TimeoutError, asyncio.CancelledError, httpx.HTTPError, OSError):
        pass
