"""The server side of RFC 6455 WebSockets, just enough for ComfyUI's /ws on the stand-in.

The stand-in serves it from its http.server handler on the same port: the route answers 101
with `handshake_headers`, then `WebSocket.serve` owns the connection. Server frames are
unmasked text frames; the reader answers pings with pongs and a close with a close, and drops
data frames (ComfyUI's clients send nothing the server needs). `Hub` broadcasts to every open
connection, as ComfyUI's send_sync does for messages without a target.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import struct
import threading
from collections.abc import Callable, Mapping
from io import BufferedIOBase
from typing import Any

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_FRAME = 1 << 20  # a client frame larger than this ends the connection (1009)


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def handshake_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The 101 reply's headers for an upgrade request (lower-case `headers`); None when the
    request is not a valid WebSocket upgrade."""
    key = headers.get("sec-websocket-key", "")
    if headers.get("upgrade", "").lower() != "websocket" or not key \
            or "upgrade" not in headers.get("connection", "").lower() \
            or headers.get("sec-websocket-version") != "13":
        return None
    return {"Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Accept": accept_key(key)}


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


class WebSocket:
    def __init__(self, reader: BufferedIOBase, writer: BufferedIOBase) -> None:
        self.reader = reader
        self.writer = writer
        # The reader thread (pongs, close) and broadcasters write: one frame at a time.
        self._write_lock = threading.Lock()
        self.closed = False

    def _send(self, opcode: int, payload: bytes) -> None:
        with self._write_lock:
            if self.closed and opcode != OP_CLOSE:
                raise ConnectionError("the WebSocket is closed")
            self.writer.write(_frame(opcode, payload))
            self.writer.flush()

    def send_json(self, obj: Any) -> None:
        """Send `obj` as a text frame; raises OSError when the peer is gone."""
        self._send(OP_TEXT, json.dumps(obj).encode())

    def _read_exact(self, n: int) -> bytes | None:
        data = self.reader.read(n) if n else b""
        return data if len(data) == n else None  # short: the peer went away

    def _read_frame(self) -> tuple[int, bytes] | None:
        head = self._read_exact(2)
        if head is None:
            return None
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        masked = bool(head[1] & 0x80)
        if n >= 126:
            ext = self._read_exact(2 if n == 126 else 8)
            if ext is None:
                return None
            n = struct.unpack("!H" if len(ext) == 2 else "!Q", ext)[0]
        if n > MAX_FRAME:
            self._close(1009)
            return None
        mask = self._read_exact(4) if masked else b"\0\0\0\0"
        payload = self._read_exact(n)
        if mask is None or payload is None:
            return None
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return opcode, payload

    def _close(self, code: int, reason: bytes = b"") -> None:
        with contextlib.suppress(OSError):
            self._send(OP_CLOSE, struct.pack("!H", code) + reason)
        self.closed = True

    def serve(self, on_message: Callable[[int, bytes], None] | None = None) -> None:
        """Read frames until the peer closes or goes away."""
        try:
            while not self.closed:
                frame = self._read_frame()
                if frame is None:
                    break
                opcode, payload = frame
                if opcode == OP_CLOSE:
                    # echo the status code, as RFC 6455 section 5.5.1 asks
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1000
                    self._close(code)
                elif opcode == OP_PING:
                    self._send(OP_PONG, payload)
                elif opcode in (OP_TEXT, OP_BINARY, OP_CONT) and on_message is not None:
                    on_message(opcode, payload)
        except OSError:
            pass  # the peer went away
        finally:
            self.closed = True


class Hub:
    """The open connections, for broadcasts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[WebSocket] = []

    def add(self, ws: WebSocket, first: Any = None) -> None:
        """Join `ws`, sending it `first` (unless None) before any broadcast reaches it: a
        broadcast either took its list before the join or sends after `first`. Raises
        OSError when the peer is already gone."""
        with self._lock:
            if first is not None:
                ws.send_json(first)
            self._sockets.append(ws)

    def remove(self, ws: WebSocket) -> None:
        with self._lock:
            if ws in self._sockets:
                self._sockets.remove(ws)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sockets)

    def broadcast(self, obj: Any) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for ws in sockets:
            try:
                ws.send_json(obj)
            except OSError:
                self.remove(ws)  # gone: its reader ends on its own
