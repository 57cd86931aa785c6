"""The stand-in's HTTP server: /health, /sim/busy, and its `--api` routes (HTTP/1.1).

Requests on one connection are kept alive: every whole reply carries Content-Length and the
request body is always read, so each request starts where the last reply ended. A streamed
reply (`Reply.stream`) goes out with chunked transfer encoding, a chunk written as each is
produced; an upgrade (`Reply.upgrade`, ComfyUI's /ws) takes the connection over after 101.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gpu_manager.sim.base import Api, Reply, Request
from gpu_manager.sim.memory import DeviceOOM
from gpu_manager.sim.serving import Busy


class _BadRequest(Exception):
    """The request cannot be read (its framing is broken): answered 400, connection closed."""


class Handler(BaseHTTPRequestHandler):
    server: StandInServer
    # Keep-alive between requests (clients with a connection pool, the front door); every
    # whole reply carries Content-Length, a stream is chunked, so the next request's start
    # is always where this reply ends.
    protocol_version = "HTTP/1.1"
    # Each streamed token leaves at once rather than waiting for the client's delayed ACK.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            # Always read the body, whatever the route: left unread, it would be parsed as
            # the next request on this connection.
            raw = self._read_body()
        except (_BadRequest, ValueError) as exc:
            # where the next request would start is unknown: this connection is done
            self._reply(400, {"error": f"unreadable request body: {exc}"}, close=True)
            return
        path = urllib.parse.urlsplit(self.path).path
        if (method, path) == ("GET", "/health"):
            self._health()
        elif (method, path) == ("POST", "/sim/busy"):
            self._sim_busy(raw)
        elif self.server.api is not None:
            self._api(method, raw)
        elif method == "POST":
            self.send_error(501, f"Unsupported method ({self.command!r})")  # as before --api
        else:
            self._reply(404, {"error": "not found"})

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"x", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields: nothing we use
                    return b"".join(parts)
                part = self.rfile.read(size)
                if len(part) != size or self.rfile.readline(1024) not in (b"\r\n", b"\n"):
                    raise _BadRequest("a chunk ended early")
                parts.append(part)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise _BadRequest("negative Content-Length")
        return self.rfile.read(length) if length else b""

    def _health(self) -> None:
        srv = self.server
        now = time.monotonic()
        ready = now >= srv.ready_at
        sick = srv.sick_at is not None and now >= srv.sick_at
        code = 500 if sick else 200 if ready else 503
        self._reply(code, {
            "status": "unhealthy" if sick else "ok" if ready else "starting",
            "name": srv.name, "pid": os.getpid(), "vram_mb": srv.vram_mb,
            # wall-clock time /health turned 200, so callers can measure their own latency
            "ready_at": time.time() - (now - srv.ready_at),
            # this process's own start-to-healthy time, exec included (CLOCK_BOOTTIME based:
            # psutil's create_time is only as precise as the whole-second boot time)
            "startup_total_s": srv.ready_at - now + time.clock_gettime(time.CLOCK_BOOTTIME)
            - _process_start_boottime(),
        })

    def _sim_busy(self, raw: bytes) -> None:
        """A simulation control, not a server's API: answered before start-up is over too."""
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._reply(400, {"error": "the body must be a JSON object"})
            return
        busy = self.server.busy
        seconds, pct = body.get("seconds"), body.get("util_pct", busy.util_pct)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0 \
                or isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            self._reply(400, {"error": "seconds must be >= 0 and util_pct 0..100"})
            return
        until = busy.hold(float(seconds), pct)
        if until is None:
            self._reply(409, {"error": "no simulated GPU registration to make busy"})
            return
        self._reply(200, {"busy_until": until})

    def _api(self, method: str, raw: bytes) -> None:
        srv = self.server
        assert srv.api is not None
        url = urllib.parse.urlsplit(self.path)
        if time.monotonic() < srv.ready_at:
            self._send(Reply(503, {"error": "starting"}))
            return
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            self._send(Reply(400, {"error": "the body is not valid JSON"}))
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request(method, url.path, urllib.parse.parse_qs(url.query), body, headers)
        try:
            reply = srv.api.handle(req)
        except DeviceOOM as exc:  # any wake path that did not map it itself
            reply = Reply(500, {"error": str(exc)})
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        if reply.upgrade is not None:
            self.send_response(reply.code)
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.close_connection = True  # the protocol's until it returns, then closed
            reply.upgrade(self.rfile, self.wfile)
            return
        if reply.stream is not None:
            self._send_stream(reply, reply.stream)
            return
        if reply.raw is not None:
            data = reply.raw
        else:
            data = b"" if reply.body is None else json.dumps(reply.body).encode()
        self.send_response(reply.code)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in reply.headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, reply: Reply, stream: Iterator[bytes]) -> None:
        """Write each chunk as it is produced; stop producing when the client goes away."""
        # An HTTP/1.0 client knows no chunked encoding: the end of the body is the close.
        chunked = self.request_version != "HTTP/1.0"
        try:
            self.send_response(reply.code)
            self.send_header("Content-Type", reply.content_type)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")  # sets close_connection too
            for k, v in reply.headers.items():
                self.send_header(k, v)
            self.end_headers()
            for chunk in stream:
                if not chunk:
                    continue  # an empty chunk would end the body
                # one write per chunk, size line and data together: one segment on the wire
                self.wfile.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                self.wfile.flush()
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; the finally stops the producer
        except BaseException:
            self.close_connection = True  # the body is cut short: the connection is unusable
            raise
        finally:
            close = getattr(stream, "close", None)
            if callable(close):
                close()

    def _reply(self, code: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")  # sets close_connection too
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # health checks every 100 ms would flood the service log


def _process_start_boottime() -> float:
    """When this process was created, in CLOCK_BOOTTIME seconds (from /proc/self/stat)."""
    stat = Path("/proc/self/stat").read_text()
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return start_ticks / os.sysconf("SC_CLK_TCK")


class StandInServer(ThreadingHTTPServer):
    """What the handler needs of the stand-in; main() sets every attribute before serving."""

    daemon_threads = True
    ready_at: float
    sick_at: float | None
    name: str
    vram_mb: int
    api: Api | None
    busy: Busy
