"""WebSocket through `/svc/<name>/...` (ComfyUI's `/ws` progress stream).

Connecting is a request like any other: it starts or wakes the service and waits its turn.
Once open, the socket holds no slot: a progress stream is not work on the GPU, and a page
that keeps it open all day must neither keep the service from being released nor count as
in flight for the idle release. When the service goes (released, crashed), its side closes
and the client's is closed with 1012 (service restart), so the page reconnects, which
starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from loguru import logger
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

if TYPE_CHECKING:
    from gpu_manager.frontdoor.door import FrontDoor

# Not forwarded: the handshake's own headers (the client library writes them), credentials.
_DROP = frozenset({"host", "connection", "upgrade", "sec-websocket-key",
                   "sec-websocket-version", "sec-websocket-extensions",
                   "sec-websocket-protocol", "authorization", "x-service-token", "cookie"})


async def bridge(door: FrontDoor, scope: Scope, receive: Receive, send: Send, name: str,
                 path: str) -> None:
    cfg = door.serve_of(name)
    assert cfg is not None
    first = await receive()
    if first["type"] != "websocket.connect":
        return
    slot = await door.admit(name, cfg)
    slot.release()
    qs = scope.get("query_string", b"")
    url = "ws" + cfg.url[len("http"):] + path + ("?" + qs.decode("latin-1") if qs else "")
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
               if k.decode("latin-1").lower() not in _DROP]
    try:
        upstream = await connect(url, additional_headers=headers,
                                 subprotocols=scope.get("subprotocols") or None,
                                 open_timeout=cfg.connect_timeout_s, max_size=None,
                                 ping_interval=None)
    except Exception as exc:  # refused, timed out, not a WebSocket: the client hears 1011
        logger.warning(f"front door: WebSocket to {name} failed: {type(exc).__name__}: {exc}")
        await send({"type": "websocket.close", "code": 1011,
                    "reason": f"{name} did not accept the WebSocket"})
        return
    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
    down = asyncio.create_task(_down(upstream, send), name=f"ws-down-{name}")
    up = asyncio.create_task(_up(upstream, receive), name=f"ws-up-{name}")
    try:
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (down, up):
            task.cancel()
        await asyncio.gather(down, up, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await upstream.close()


async def _down(upstream: ClientConnection, send: Send) -> None:
    try:
        async for message in upstream:
            if isinstance(message, str):
                await send({"type": "websocket.send", "text": message})
            else:
                await send({"type": "websocket.send", "bytes": message})
    except ConnectionClosed:
        pass
    code = upstream.close_code
    with contextlib.suppress(Exception):
        await send({"type": "websocket.close",
                    "code": 1012 if code in (None, 1000, 1001, 1006) else code})


async def _up(upstream: ClientConnection, receive: Receive) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg["type"] != "websocket.receive":
            continue
        try:
            if msg.get("text") is not None:
                await upstream.send(msg["text"])
            elif msg.get("bytes") is not None:
                await upstream.send(msg["bytes"])
        except ConnectionClosed:
            return
